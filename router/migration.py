"""Request migration by token replay: a decode worker lost mid-stream costs the client nothing.

As in NVIDIA Dynamo, the router is the one place that knows every token a client has seen, so
it alone can resume a sequence elsewhere. When the decode worker of a stream is lost after its
first token (the stream broke or answered UNAVAILABLE: `WorkerLostError`; or the worker left
the registry while the stream was silent), the request is sent again to a live decode worker
with the prompt followed by the tokens already streamed and
``SamplingParams.resumed_output_tokens`` counting them. The engine treats those ids as output
(`engine.resume`), so the seeded sampler draws the same noise at the same positions,
min/max_tokens and penalties keep counting, and its detokenizer and stop-string hold-back
replay them: the text it streams starts exactly after the text the client already has. The
client's stream therefore continues with no visible error and no token duplicated or missing;
greedy and seeded requests yield the same text as an uninterrupted run.

Bounds: at most ``max_migrations`` moves per sequence; when no other decode worker is live
(a one-worker pool waiting for its restart), it waits up to ``migration_wait_s`` (and never
past the request's deadline) for one. A worker is excluded by incarnation (id and address):
the same id restarted on a new address is a fresh candidate. The resumed request is prefilled
by the decode worker itself. Only then does the error reach the client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from engine.block_hash import prompt_block_hashes
from engine.sampling_params import SamplingParams
from router.backend import TokenDelta
from router.errors import NoWorkersError, RequestTimeoutError, WorkerLostError, WorkerUnavailableError

if TYPE_CHECKING:
    from router.dispatch import Dispatcher, OpenStream, RoutedPrompt

log = logging.getLogger(__name__)

WATCH_S = 1.0  # while a stream is silent, how often its worker's registry presence is checked
_POLL_S = 0.1  # how often a lost stream looks for a decode worker to move to


async def migrating_stream(
    dispatcher: Dispatcher, routed: RoutedPrompt, request_id: str, params: SamplingParams,
    deadline: float | None = None,
) -> AsyncIterator[TokenDelta]:
    """The deltas of one sequence, resumed on another decode worker whenever its own is lost."""
    emitted: list[int] = []  # every token the client has received, in order
    lost: set[tuple[str, str]] = set()  # (worker id, address) incarnations that failed it
    migrations = 0
    current = routed
    while True:
        resumed = dataclasses.replace(params, resumed_output_tokens=len(emitted)) if emitted else params
        rid = request_id if migrations == 0 else f"{request_id}-m{migrations}"
        try:
            opened = await dispatcher.open(current, rid, resumed, deadline, lost, local_prefill=migrations > 0)
        except (WorkerUnavailableError, NoWorkersError) as e:
            if migrations == 0:  # before any token: the dispatcher's own retries were the policy
                raise
            opened, failure = None, e
        if opened is not None:
            if migrations:
                dispatcher.metrics.migrations.labels("succeeded").inc()
            try:
                async for delta in _watched(dispatcher, opened, first_ever=not emitted):
                    emitted.extend(delta.token_ids)
                    yield delta
                return
            except WorkerLostError as e:
                lost.add((e.worker_id, e.address))
                failure = e
        migrations += 1
        if params.max_tokens is not None and len(emitted) >= params.max_tokens:
            yield TokenDelta([], finish_reason="length")  # lost with its last token already sent
            return
        log.warning("request %s: %s; migrating after %d tokens (migration %d)", request_id, failure,
                    len(emitted), migrations)
        await _before_migration(dispatcher, failure, migrations, lost, deadline)
        current = _resumed_prompt(dispatcher, routed, emitted)


async def _before_migration(
    dispatcher: Dispatcher, failure: Exception, migrations: int, lost: set[tuple[str, str]],
    deadline: float | None,
) -> None:
    """Count the attempt and wait for a decode worker to move to; raise (and count the failure)
    when the bound is reached or none comes back in time: only then does the client see it."""
    metrics = dispatcher.metrics.migrations
    if migrations > dispatcher.max_migrations:
        metrics.labels("failed").inc()
        raise failure
    metrics.labels("attempted").inc()
    if await _wait_for_decode(dispatcher, lost, deadline):
        return
    metrics.labels("failed").inc()
    if deadline is not None and time.monotonic() >= deadline:
        raise RequestTimeoutError("request timed out while waiting for a decode worker to migrate to")
    raise NoWorkersError(f"decode worker lost mid-stream ({failure}) and none came back within "
                         f"{dispatcher.migration_wait_s:g}s")


def _resumed_prompt(dispatcher: Dispatcher, routed: RoutedPrompt, emitted: list[int]) -> RoutedPrompt:
    """The prompt plus what was streamed, routed afresh (among the workers not lost)."""
    from router.dispatch import RoutedPrompt

    ids = routed.prompt_token_ids + emitted
    hashes = prompt_block_hashes(ids, dispatcher.policy.settings.block_size) if routed.block_hashes else ()
    return RoutedPrompt(ids, hashes, None)


async def _watched(dispatcher: Dispatcher, opened: OpenStream, first_ever: bool) -> AsyncIterator[TokenDelta]:
    """``opened``'s deltas; `WorkerLostError` when its worker leaves the registry while the stream
    is silent (a frozen or partitioned worker breaks no connection). The backend stream is
    closed on every exit.

    The registry is checked by a timer every `WATCH_S`, not per delta: when the worker is gone
    while this task waits for a delta, the timer cancels the task, and the cancellation, ours
    alone, becomes the `WorkerLostError` (a token path with no extra task or wake-up)."""
    rest = opened.rest
    watch = _Watch(dispatcher, opened)
    try:
        first = opened.first
        yield first if first_ever else dataclasses.replace(first, cached_tokens=None)
        while True:
            if watch.lost:
                raise watch.error()
            watch.waiting = True
            try:
                delta = await anext(rest)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if watch.cancelled and watch.task.uncancel() == 0:  # nobody else cancelled us
                    raise watch.error() from None
                raise
            finally:
                watch.waiting = False
            yield delta
    finally:
        watch.close()
        await rest.aclose()


class _Watch:
    """The timer behind `_watched`: marks the stream lost once its worker left the registry,
    and cancels the consuming task if it is waiting for a delta then."""

    def __init__(self, dispatcher: Dispatcher, opened: OpenStream) -> None:
        self.dispatcher, self.opened = dispatcher, opened
        self.task = asyncio.current_task()
        self.lost = self.waiting = self.cancelled = False
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(WATCH_S, self._check) if opened.decode_worker_id else None

    def _check(self) -> None:
        if not _gone(self.dispatcher, self.opened):
            self._handle = self._loop.call_later(WATCH_S, self._check)
            return
        self.lost, self._handle = True, None
        if self.waiting and self.task is not None:
            self.cancelled = True
            self.task.cancel()

    def error(self) -> WorkerLostError:
        o = self.opened
        return WorkerLostError(o.decode_worker_id, o.decode_address, f"decode worker {o.decode_worker_id} left the "
                               "registry")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def _gone(dispatcher: Dispatcher, opened: OpenStream) -> bool:
    if not opened.decode_worker_id:  # the backend picked: there is no registry to watch
        return False
    w = dispatcher.cluster.worker(opened.decode_worker_id)
    return w is None or w.info.address != opened.decode_address


async def _wait_for_decode(dispatcher: Dispatcher, lost: set[tuple[str, str]], deadline: float | None) -> bool:
    """Whether a decode worker other than the lost incarnations is live, waiting up to
    ``migration_wait_s`` (and never past ``deadline``) for one to (re)appear."""
    cluster = dispatcher.cluster
    end = time.monotonic() + dispatcher.migration_wait_s
    if deadline is not None:
        end = min(end, deadline)
    while True:
        live = cluster.snapshot().decode
        if (cluster.static and not cluster.workers()) or any((w.worker_id, w.info.address) not in lost for w in live):
            return True
        if time.monotonic() >= end:
            return False
        await asyncio.sleep(_POLL_S)
