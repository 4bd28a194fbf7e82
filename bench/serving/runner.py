"""Drives a run: warm-up, then every prompt sent on its arrival schedule, bounded in time.

Warm-up requests go first, all answered before the clock starts, and are never recorded: they
pay for connection set-up, lazy compilation and cold caches. The measured run then sends prompt
i at its planned offset (waiting for a concurrency slot where there is a cap) until the prompts
or ``duration_s`` run out, and ends when the last in-flight answer arrives; each request is
bounded by the client timeout, so the whole run is bounded too.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
from tqdm import tqdm

from bench.serving.arrivals import Arrivals
from bench.serving.client import RequestOptions, send_request
from bench.serving.record import RequestRecord
from bench.serving.workload import Prompt


@dataclass(frozen=True)
class RunSettings:
    """How to reach the server and how long to keep at it."""

    base_url: str
    api_key: str | None = None
    timeout_s: float = 600.0
    duration_s: float | None = None  # stop sending after this long (None: send every prompt)
    progress: bool = True


@dataclass
class RunOutcome:
    records: list[RequestRecord]
    duration_s: float
    warmup: list[RequestRecord]


def http_client(
    settings: RunSettings, max_connections: int | None, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """One connection pool for the run, as large as the concurrency (httpx's default of 100 would
    silently cap an uncapped run)."""
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    return httpx.AsyncClient(
        base_url=settings.base_url,
        headers=headers,
        timeout=httpx.Timeout(settings.timeout_s, connect=min(settings.timeout_s, 30.0)),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        transport=transport,
    )


async def run(
    settings: RunSettings,
    options: RequestOptions,
    arrivals: Arrivals,
    prompts: Sequence[Prompt],
    warmup: Sequence[Prompt],
    count_tokens: Callable[[str], int],
    transport: httpx.AsyncBaseTransport | None = None,
) -> RunOutcome:
    """Warm up, then run ``prompts``; every request's record comes back, failed ones included.
    No records (only warm-up ones) means no warm-up request got an answer, so the run was not started."""
    async with http_client(settings, arrivals.concurrency, transport) as http:
        warm = await _warm_up(http, options, arrivals, warmup, count_tokens)
        if warmup and not any(r.ok for r in warm):
            return RunOutcome([], 0.0, warm)
        records, duration = await _measure(http, settings, options, arrivals, prompts, count_tokens)
    return RunOutcome(records, duration, warm)


async def _warm_up(
    http: httpx.AsyncClient, options: RequestOptions, arrivals: Arrivals, prompts: Sequence[Prompt],
    count_tokens: Callable[[str], int],
) -> list[RequestRecord]:
    slots = asyncio.Semaphore(arrivals.concurrency or max(1, len(prompts)))

    async def one(i: int, p: Prompt) -> RequestRecord:
        async with slots:
            return await send_request(http, options, p, RequestRecord(i, p.input_len, p.output_len), count_tokens)

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


async def _measure(
    http: httpx.AsyncClient, settings: RunSettings, options: RequestOptions, arrivals: Arrivals,
    prompts: Sequence[Prompt], count_tokens: Callable[[str], int],
) -> tuple[list[RequestRecord], float]:
    slots = asyncio.Semaphore(arrivals.concurrency) if arrivals.concurrency else None
    deadline = math.inf if settings.duration_s is None else settings.duration_s
    bar = tqdm(total=len(prompts), desc="requests", unit="req", disable=not settings.progress, leave=False)
    tasks: list[asyncio.Task[RequestRecord]] = []
    start = time.perf_counter()

    async def one(record: RequestRecord, prompt: Prompt) -> RequestRecord:
        try:
            record.send = time.perf_counter() - start
            return await send_request(http, options, prompt, record, count_tokens)
        finally:
            if slots is not None:
                slots.release()
            bar.update(1)

    try:
        for i, (prompt, due) in enumerate(zip(prompts, arrivals.offsets(len(prompts)))):
            if due >= deadline:
                break
            if (wait := due - (time.perf_counter() - start)) > 0:
                await asyncio.sleep(wait)
            if slots is not None:
                await slots.acquire()
            if time.perf_counter() - start >= deadline:
                if slots is not None:
                    slots.release()
                break
            tasks.append(asyncio.create_task(one(RequestRecord(i, prompt.input_len, prompt.output_len), prompt)))
        records = list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        bar.close()
    return records, time.perf_counter() - start
