"""One streaming request to ``/v1/completions`` or ``/v1/chat/completions``, timed chunk by chunk.

Plain httpx with our own SSE parsing rather than the openai SDK: the SDK's parsing and model
building sit between the socket and the clock, and we want the time each chunk arrived. Any
failure (HTTP status, an in-band error event, a broken stream, a timeout) becomes the record's
``error``; nothing here raises, so one bad request never ends a run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.serving.record import RequestRecord
from bench.serving.workload import Endpoint, Prompt

PATHS: dict[str, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class RequestOptions:
    """What every request of a run carries besides its prompt."""

    model: str
    endpoint: Endpoint = "completions"
    ignore_eos: bool = True
    include_usage: bool = True
    temperature: float | None = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)

    def payload(self, prompt: Prompt) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": prompt.output_len, "stream": True}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt.text}]
        else:
            body["prompt"] = prompt.text
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return {**body, **self.extra_body}


class _StreamError(Exception):
    pass


async def send_request(
    http: httpx.AsyncClient,
    options: RequestOptions,
    prompt: Prompt,
    record: RequestRecord,
    count_tokens: Callable[[str], int],
) -> RequestRecord:
    """Stream ``prompt`` and fill ``record``; ``count_tokens`` counts the output when usage is missing."""
    start = time.perf_counter()
    parts: list[str] = []
    usage: dict[str, Any] | None = None
    try:
        async with http.stream("POST", PATHS[options.endpoint], json=options.payload(prompt)) as resp:
            if resp.status_code != 200:
                raise _StreamError(f"HTTP {resp.status_code}: {_error_message(await resp.aread())}")
            async for line in resp.aiter_lines():
                event = _parse_event(line)
                if event is None:
                    continue
                if event == "[DONE]":
                    break
                text, usage = _read_chunk(event, options.endpoint, usage)
                if text:
                    now = time.perf_counter() - start
                    record.chunk_times.append(now)
                    if record.ttft is None:
                        record.ttft = now
                    parts.append(text)
        record.latency = time.perf_counter() - start
    except _StreamError as e:
        record.error = str(e)
        return record
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:  # transport failures, malformed events
        record.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return record
    _finish(record, "".join(parts), usage, count_tokens)
    return record


def _finish(record: RequestRecord, text: str, usage: dict[str, Any] | None, count: Callable[[str], int]) -> None:
    record.text = text
    if usage and isinstance(usage.get("completion_tokens"), int):
        record.output_tokens, record.output_tokens_from = usage["completion_tokens"], "usage"
        record.prompt_tokens = usage.get("prompt_tokens")
    else:
        record.output_tokens, record.output_tokens_from = count(text), "tokenizer"
    if record.ttft is None:
        record.error = "the stream carried no output text"
    else:
        record.ok = True


def _parse_event(line: str) -> str | dict[str, Any] | None:
    """The payload of one SSE ``data:`` line: ``"[DONE]"``, a JSON object, or None for anything else."""
    if not line.startswith("data:"):
        return None  # blank separators, comments, event names
    data = line[5:].strip()
    if data == "[DONE]":
        return data
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise _StreamError(f"unexpected stream event {data[:200]!r}")
    if "error" in obj:
        raise _StreamError(f"error event: {_error_message(data.encode())}")
    return obj


def _read_chunk(
    event: str | dict[str, Any], endpoint: Endpoint, usage: dict[str, Any] | None
) -> tuple[str, dict[str, Any] | None]:
    assert isinstance(event, dict)
    usage = event.get("usage") or usage
    text = ""
    for choice in event.get("choices") or []:
        if endpoint == "chat":
            text += (choice.get("delta") or {}).get("content") or ""
        else:
            text += choice.get("text") or ""
    return text, usage


def _error_message(body: bytes) -> str:
    """The ``message`` of an OpenAI error body, else the body's start."""
    try:
        obj = json.loads(body)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
    except ValueError:
        pass
    return body[:300].decode(errors="replace")
