"""Bounded admission: the router's own count of the work it has let in, per pool.

Heartbeats report a worker's queue up to a second late, and a burst of hundreds of requests
arrives well inside that second, so a limit read from heartbeats alone admits all of them
(the 260 s latencies of issue 15). The router therefore counts what it admitted itself: a
sequence (one choice of one prompt) is *in flight* from admission until its stream ends, and
its prompt tokens are *queued* on the pool that computes them (prefill when a prefill worker
was chosen, else decode) until its first token arrives. A request that would push either
count past its limit is refused at once with 429 and ``Retry-After``, before any worker is
contacted, so an overloaded router answers in microseconds instead of queueing.

Templating and tokenizing a request cost milliseconds of the router's one event loop; with
hundreds arriving at once the last would wait seconds for its 429. So `AdmissionGate`, an ASGI
middleware, refuses generation requests before their body is even read while the requests in
flight plus those *arriving* (let through the gate, not yet admitted or refused) fill the
in-flight limit: a burst cannot all slip through while the first of it is still being parsed.
The exact check (`Admission.admit`, which knows the prompt's pool, length and ``n``) runs once
the request is routed; `arrived` ends a request's arriving state exactly once.

A request that alone exceeds a limit is admitted when the pool it needs is idle: otherwise it
could never run. Everything runs on the router's event loop, so the counts need no lock.
Every admission returns a `Ticket`; `Ticket.release` is idempotent, and the app calls it on
every end of a request (completion, error, client disconnect, timeout), so each count is
given back exactly once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from protocol.registry import POOLS, PoolName
from router.backend import TokenDelta
from router.errors import QueueFullError, error_response
from router.policy import RouteDecision


@dataclass(frozen=True)
class AdmissionLimits:
    """0 disables a limit."""

    max_in_flight_requests: int = 1024  # sequences streaming at once, over the whole decode pool
    max_queued_prompt_tokens: int = 1_048_576  # per pool: admitted prompt tokens whose first token is not back
    retry_after_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_in_flight_requests", "max_queued_prompt_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0 (0: no limit), got {getattr(self, name)}")
        if not self.retry_after_s > 0:
            raise ValueError(f"retry_after_s: must be > 0, got {self.retry_after_s}")


@dataclass(frozen=True)
class Charge:
    """What one sequence costs until it ends: its prompt tokens, queued on ``pool``."""

    pool: PoolName
    prompt_tokens: int


def charge_for(decision: RouteDecision | None, prompt_tokens: int) -> Charge:
    """A sequence's prompt queues on the pool that computes it."""
    disaggregated = decision is not None and decision.prefill_worker_id is not None
    return Charge("prefill" if disaggregated else "decode", prompt_tokens)


class Admission:
    """The counts and the admit/refuse decision; see the module docstring."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.in_flight = 0
        self.queued_tokens: dict[str, int] = dict.fromkeys(POOLS, 0)
        self.arriving = 0  # through the gate, not yet admitted or refused
        self.rejected = 0

    def admit(self, charges: Sequence[Charge]) -> Ticket:
        """Count ``charges`` (one per sequence of a request) or raise `QueueFullError` (429)."""
        self._check(charges)
        self.in_flight += len(charges)
        for c in charges:
            self.queued_tokens[c.pool] += c.prompt_tokens
        return Ticket(self, list(charges))

    def check_room(self) -> None:
        """Raise `QueueFullError` when not even one more sequence could be admitted now."""
        limit = self.limits.max_in_flight_requests
        if limit and self.in_flight + self.arriving >= limit:
            self._refuse(f"{self.in_flight + self.arriving} requests in flight "
                         f"(router.max_in_flight_requests={limit})")

    def arrived(self, state: dict[str, object]) -> None:
        """The request whose ASGI ``state`` this is has reached `admit` (or ended): it no longer
        holds an arriving slot. Safe to call any number of times."""
        if state.pop(_ARRIVING, None) is not None:
            self.arriving -= 1

    def _check(self, charges: Sequence[Charge]) -> None:
        lim = self.limits
        if lim.max_in_flight_requests and self.in_flight and self.in_flight + len(charges) > lim.max_in_flight_requests:
            self._refuse(f"{self.in_flight} requests in flight (router.max_in_flight_requests="
                         f"{lim.max_in_flight_requests})")
        if not lim.max_queued_prompt_tokens:
            return
        for pool in POOLS:
            want = sum(c.prompt_tokens for c in charges if c.pool == pool)
            have = self.queued_tokens[pool]
            if want and have and have + want > lim.max_queued_prompt_tokens:
                self._refuse(f"{have} prompt tokens queued for the {pool} pool "
                             f"(router.max_queued_prompt_tokens={lim.max_queued_prompt_tokens})")

    def _refuse(self, why: str) -> None:
        self.rejected += 1
        raise QueueFullError(f"server overloaded: {why}; retry later", retry_after_s=self.limits.retry_after_s)

    def _unqueue(self, charge: Charge) -> None:
        self.queued_tokens[charge.pool] -= charge.prompt_tokens


class Ticket:
    """One admitted request's share of the counts; give it back with `prefilled` and `release`."""

    def __init__(self, admission: Admission, charges: list[Charge]) -> None:
        self._admission = admission
        self._charges: list[Charge | None] = list(charges)  # None: its prompt tokens are given back
        self._released = False

    def prefilled(self, index: int) -> None:
        """Sequence ``index`` produced its first token: its prompt is no longer queued."""
        charge = self._charges[index]
        if charge is not None and not self._released:
            self._charges[index] = None
            self._admission._unqueue(charge)

    def release(self) -> None:
        """The request ended, however it ended; a second call does nothing."""
        if self._released:
            return
        self._released = True
        for charge in self._charges:
            if charge is not None:
                self._admission._unqueue(charge)
        self._admission.in_flight -= len(self._charges)

    async def meter(self, index: int, stream: AsyncIterator[TokenDelta]) -> AsyncIterator[TokenDelta]:
        """``stream`` unchanged, calling `prefilled` at its first delta (closing closes it)."""
        try:
            async for delta in stream:
                self.prefilled(index)
                yield delta
        finally:
            await stream.aclose()  # type: ignore[attr-defined]


_ARRIVING = "splitserve.admission.arriving"


class AdmissionGate:
    """Refuses requests to ``paths`` with 429 before reading their body while `Admission` is full;
    lets the others through as arriving (the app calls `Admission.arrived` before `admit`)."""

    def __init__(self, app: ASGIApp, admission: Admission, paths: tuple[str, ...]) -> None:
        self.app, self.admission, self.paths = app, admission, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            return await self.app(scope, receive, send)
        try:
            self.admission.check_room()
        except QueueFullError as e:
            return await error_response(e)(scope, receive, send)
        state = scope.setdefault("state", {})
        state[_ARRIVING] = True
        self.admission.arriving += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.arrived(state)  # refused before `admit` (400, 404...): the slot is free again
