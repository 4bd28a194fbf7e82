"""Turning backend deltas into OpenAI responses: merging choices, accounting, chunk shapes.

`merge_choices` runs each choice's stream in its own task and interleaves their deltas as
they arrive; the client disconnecting or the deadline passing arrive through the same queue
(as sentinels), so waiting for the next token never needs a watchdog task per token. Closing
the merged iterator cancels every choice task, and each task closes its own backend stream
(an async generator must be closed by the task that iterates it).

A `Tracker` accumulates what the response needs (text, token counts, logprobs, finish
reasons) and feeds the latency histograms; usage is counted here, at the router, from the
token ids the backend reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from engine.sampling_params import SamplingParams
from protocol.stream import TokenLogprob
from router import protocol as P
from router.backend import TokenDelta, Tokenizer
from router.dispatch import RoutedPrompt
from router.errors import ClientDisconnectedError, RequestTimeoutError
from router.metrics import RouterMetrics

_END, _DISCONNECTED, _TIMEOUT = object(), object(), object()


@dataclass(frozen=True)
class ChoiceJob:
    index: int
    routed: RoutedPrompt
    params: SamplingParams


async def _watch_disconnect(request: Request, queue: asyncio.Queue[Any]) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            queue.put_nowait((-1, _DISCONNECTED))
            return


async def merge_choices(
    streams: list[AsyncIterator[TokenDelta]], request: Request | None, deadline: float | None
) -> AsyncIterator[tuple[int, TokenDelta]]:
    """Interleave ``(choice index, delta)`` from every stream until all end."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[TokenDelta]) -> None:
        try:
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for delta in stream:
                    queue.put_nowait((i, delta))
            queue.put_nowait((i, _END))
        except Exception as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    if request is not None:
        tasks.append(asyncio.create_task(_watch_disconnect(request, queue)))
    timer = None
    if deadline is not None:
        timer = asyncio.get_running_loop().call_later(
            max(0.0, deadline - time.monotonic()), queue.put_nowait, (-1, _TIMEOUT)
        )
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif item is _DISCONNECTED:
                raise ClientDisconnectedError("client disconnected")
            elif item is _TIMEOUT:
                raise RequestTimeoutError("request timed out")
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        if timer is not None:
            timer.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[tuple[int, TokenLogprob]] = field(default_factory=list)  # (sampled id, its logprob)
    finish_reason: str | None = None
    first_at: float | None = None
    last_at: float | None = None
    started: bool = False  # role chunk sent (chat streaming)


class Tracker:
    """Per-request accounting shared by the streaming and non-streaming paths."""

    def __init__(self, n: int, prompt_tokens: int, arrival: float, metrics: RouterMetrics) -> None:
        self.choices = [_Choice() for _ in range(n)]
        self.prompt_tokens = prompt_tokens
        self.cached_tokens: int | None = None
        self.arrival = arrival
        self.metrics = metrics
        self._first_token_seen = False
        self._finished = False

    def add(self, index: int, delta: TokenDelta) -> None:
        c = self.choices[index]
        now = time.monotonic()
        if delta.token_ids:
            if c.first_at is None:
                c.first_at = now
            c.last_at = now
            c.num_tokens += len(delta.token_ids)
            self.metrics.generation_tokens.inc(len(delta.token_ids))
            if not self._first_token_seen:
                self._first_token_seen = True
                self.metrics.ttft.observe(now - self.arrival)
        if delta.text:
            c.text.append(delta.text)
        if delta.logprobs:
            c.logprobs.extend(delta.token_logprobs())
        if delta.finish_reason is not None:
            c.finish_reason = delta.finish_reason
        if delta.cached_tokens is not None:
            self.cached_tokens = max(self.cached_tokens or 0, delta.cached_tokens)

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self.metrics.e2e.observe(time.monotonic() - self.arrival)
        for c in self.choices:
            if c.num_tokens > 1 and c.first_at is not None and c.last_at is not None:
                self.metrics.tpot.observe((c.last_at - c.first_at) / (c.num_tokens - 1))

    def usage(self) -> P.Usage:
        completion = sum(c.num_tokens for c in self.choices)
        details = {"cached_tokens": self.cached_tokens} if self.cached_tokens is not None else None
        return P.Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
            prompt_tokens_details=details,
        )


class Renderer:
    """Builds one endpoint's response objects; subclasses fix the shapes."""

    def __init__(self, response_id: str, model: str, tokenizer: Tokenizer, num_logprobs: int | None) -> None:
        self.response_id = response_id
        self.model = model
        self.tokenizer = tokenizer
        self.num_logprobs = num_logprobs
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}

    def start(self, n: int, prompt_tokens: int, arrival: float, metrics: RouterMetrics) -> Tracker:
        return Tracker(n, prompt_tokens, arrival, metrics)

    def token_text(self, token_id: int) -> str:
        s = self._token_text.get(token_id)
        if s is None:
            s = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return s

    def top(self, lp: TokenLogprob) -> list[tuple[str, float]]:
        ranked = sorted(lp.top.items(), key=lambda kv: -kv[1])[: self.num_logprobs or 0]
        return [(self.token_text(t), v) for t, v in ranked]

    def chunks(self, tracker: Tracker, index: int, delta: TokenDelta, include_usage: bool) -> list[Any]:
        raise NotImplementedError

    def response(self, tracker: Tracker) -> dict[str, Any]:
        raise NotImplementedError

    def usage_chunk(self, tracker: Tracker) -> Any:
        raise NotImplementedError


class ChatRenderer(Renderer):
    def _logprobs(self, lps: list[tuple[int, TokenLogprob]] | None) -> P.ChatLogprobs | None:
        if self.num_logprobs is None or lps is None:
            return None
        content = []
        for token_id, lp in lps:
            s = self.token_text(token_id)
            top = [P.TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in self.top(lp)]
            content.append(
                P.ChatTokenLogprob(token=s, logprob=lp.logprob, bytes=list(s.encode()), top_logprobs=top)
            )
        return P.ChatLogprobs(content=content)

    def _chunk(self, choices: list[P.ChatChunkChoice], usage: P.Usage | None = None) -> P.ChatCompletionChunk:
        return P.ChatCompletionChunk(
            id=self.response_id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def chunks(self, tracker: Tracker, index: int, delta: TokenDelta, include_usage: bool) -> list[Any]:
        tracker.add(index, delta)
        c = tracker.choices[index]
        out: list[Any] = []
        if not c.started:
            c.started = True
            out.append(
                self._chunk([P.ChatChunkChoice(index=index, delta=P.ChatDelta(role="assistant", content=""))])
            )
        if delta.text or delta.logprobs or delta.finish_reason:
            choice = P.ChatChunkChoice(
                index=index,
                delta=P.ChatDelta(content=delta.text or None),
                logprobs=self._logprobs(delta.token_logprobs()) if delta.logprobs else None,
                finish_reason=delta.finish_reason,
            )
            out.append(self._chunk([choice]))
        return out

    def usage_chunk(self, tracker: Tracker) -> P.ChatCompletionChunk:
        return self._chunk([], tracker.usage())

    def response(self, tracker: Tracker) -> dict[str, Any]:
        choices = [
            P.ChatChoice(
                index=i,
                message=P.ChatResponseMessage(content="".join(c.text)),
                logprobs=self._logprobs(c.logprobs),
                finish_reason=c.finish_reason or "stop",
            )
            for i, c in enumerate(tracker.choices)
        ]
        resp = P.ChatCompletionResponse(
            id=self.response_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=tracker.usage(),
        )
        return resp.model_dump(mode="json")


class CompletionRenderer(Renderer):
    def _logprobs(self, lps: list[tuple[int, TokenLogprob]] | None, offset: int) -> P.CompletionLogprobs | None:
        if self.num_logprobs is None or lps is None:
            return None
        out = P.CompletionLogprobs()
        for token_id, lp in lps:
            s = self.token_text(token_id)
            out.tokens.append(s)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append(dict(self.top(lp)))
            out.text_offset.append(offset)
            offset += len(s)
        return out

    def _chunk(self, choices: list[P.CompletionChoice], usage: P.Usage | None = None) -> P.CompletionResponse:
        return P.CompletionResponse(
            id=self.response_id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def chunks(self, tracker: Tracker, index: int, delta: TokenDelta, include_usage: bool) -> list[Any]:
        offset = sum(len(t) for t in tracker.choices[index].text)
        tracker.add(index, delta)
        if not (delta.text or delta.logprobs or delta.finish_reason):
            return []
        choice = P.CompletionChoice(
            index=index,
            text=delta.text,
            logprobs=self._logprobs(delta.token_logprobs(), offset) if delta.logprobs else None,
            finish_reason=delta.finish_reason,
        )
        return [self._chunk([choice])]

    def usage_chunk(self, tracker: Tracker) -> P.CompletionResponse:
        return self._chunk([], tracker.usage())

    def response(self, tracker: Tracker) -> dict[str, Any]:
        choices = [
            P.CompletionChoice(
                index=i,
                text="".join(c.text),
                logprobs=self._logprobs(c.logprobs, 0),
                finish_reason=c.finish_reason or "stop",
            )
            for i, c in enumerate(tracker.choices)
        ]
        resp = P.CompletionResponse(
            id=self.response_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=tracker.usage(),
        )
        return resp.model_dump(mode="json")
