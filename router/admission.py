"""Bounded admission: the router's own count of the work it has let in, per pool.

Heartbeats report a worker's queue up to a second late, and a burst of hundreds of requests
arrives well inside that second, so a limit read from heartbeats alone admits all of them
(the 260 s latencies of issue 15). The router therefore counts what it admitted itself: a
sequence (one choice of one prompt) is *in flight* from admission until its stream ends, and
its prompt tokens are *queued* on the pool that computes them (prefill when a prefill worker
was chosen, else decode) until its first token arrives. A request that would push either
count past its limit is refused at once with 429 and ``Retry-After``, before any worker is
contacted, so an overloaded router answers in microseconds instead of queueing.

A request that alone exceeds a limit is admitted when the pool it needs is idle: otherwise it
could never run. Everything runs on the router's event loop, so the counts need no lock.
Every admission returns a `Ticket`; `Ticket.release` is idempotent, and the app calls it on
every end of a request (completion, error, client disconnect, timeout), so each count is
given back exactly once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from protocol.registry import POOLS, PoolName
from router.backend import TokenDelta
from router.errors import QueueFullError
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
        self.rejected = 0

    def admit(self, charges: Sequence[Charge]) -> Ticket:
        """Count ``charges`` (one per sequence of a request) or raise `QueueFullError` (429)."""
        self._check(charges)
        self.in_flight += len(charges)
        for c in charges:
            self.queued_tokens[c.pool] += c.prompt_tokens
        return Ticket(self, list(charges))

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
