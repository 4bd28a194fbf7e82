"""One console line per finished request, as users of `vllm serve` expect to watch go by.

    request chatcmpl-3f2a status=200 route=disaggregated prompt_tokens=412 output_tokens=64
        ttft_ms=180.2 total_ms=1432.9 finish=length

The line is written when the request ends, whichever way it ends: a full answer (200), an
error before or during generation (its HTTP status), or a client that went away (499). The
route is the router's first decision (``local``: the decode worker prefilled; ``disaggregated``:
a prefill worker did; ``backend``: no live worker view, the backend picked) — a retry after a
failed worker may have changed it. ``router.log_requests: false`` (``serve --quiet``) turns it off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from router.policy import RouteDecision

log = logging.getLogger("splitserve.requests")

CLIENT_GONE = 499  # nginx's "client closed request", as `ClientDisconnectedError` uses


class _Choice(Protocol):
    num_tokens: int
    first_at: float | None
    finish_reason: str | None


class _Tracker(Protocol):
    choices: Sequence[_Choice]


def route_label(decisions: Sequence[RouteDecision | None]) -> str:
    """``disaggregated`` when any prompt of the request went to a prefill worker."""
    if not decisions or any(d is None for d in decisions):
        return "backend"
    return "disaggregated" if any(d.disaggregated for d in decisions if d is not None) else "local"


def status_of(exc: BaseException | None) -> int:
    """The HTTP status the client saw (or would have seen) for a request that ended with ``exc``."""
    if exc is None:
        return 200
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return CLIENT_GONE
    status = getattr(exc, "status_code", 500)
    return status if isinstance(status, int) else 500


class RequestEntry:
    """One request's line, written once by `end` whichever path finishes the request."""

    def __init__(self, enabled: bool, request_id: str, prompt_tokens: int, route: str, arrival: float) -> None:
        self.enabled = enabled
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.route = route
        self.arrival = arrival
        self.tracker: _Tracker | None = None
        self.error: BaseException | None = None
        self._done = False

    def end(self, error: BaseException | None = None) -> None:
        if self._done:
            return
        self._done = True
        if self.enabled:
            log.info("%s", self.line(error or self.error or self._unfinished(), time.monotonic()))

    def _unfinished(self) -> BaseException | None:
        """A stream that ended with a choice but no finish reason and no error was cut off by
        the client (Starlette cancels the response quietly on a disconnect)."""
        choices = self.tracker.choices if self.tracker is not None else ()
        if any(c.finish_reason is None for c in choices):
            return asyncio.CancelledError()
        return None

    def line(self, error: BaseException | None, now: float) -> str:
        choices = self.tracker.choices if self.tracker is not None else ()
        firsts = [c.first_at for c in choices if c.first_at is not None]
        ttft = f"{(min(firsts) - self.arrival) * 1e3:.1f}" if firsts else "-"
        finish = ",".join(sorted({c.finish_reason for c in choices if c.finish_reason})) or "-"
        parts = [
            f"request {self.request_id}", f"status={status_of(error)}", f"route={self.route}",
            f"prompt_tokens={self.prompt_tokens}", f"output_tokens={sum(c.num_tokens for c in choices)}",
            f"ttft_ms={ttft}", f"total_ms={(now - self.arrival) * 1e3:.1f}", f"finish={finish}",
        ]
        if error is not None and status_of(error) != CLIENT_GONE:
            parts.append(f"error={type(error).__name__}")
        return " ".join(parts)


class RequestLog:
    """Hands out `RequestEntry`s; disabled, the entries write nothing."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def begin(
        self, request_id: str, prompt_tokens: int, decisions: Sequence[RouteDecision | None], arrival: float
    ) -> RequestEntry:
        return RequestEntry(self.enabled, request_id, prompt_tokens, route_label(decisions), arrival)
