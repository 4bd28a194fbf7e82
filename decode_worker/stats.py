"""Hand-over and step timing of the decode loop.

The hand-over is budgeted on its own: from "prefill done" (the prefill worker sent its
notification, after the last layer's KV write) to the start of the first decode step that
includes the sequence. It is the notification's flight (prefill's wall clock to ours: exact on
one host, subject to clock skew across hosts) plus the wait in our loop. Because the loop polls
notifications between steps, the wait is at most the step that was running, so the hand-over
should stay under one decode step; ``Status`` reports both so that can be checked.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass

_WINDOW = 1024  # recent samples kept for percentiles


@dataclass(frozen=True)
class TimingSummary:
    handover_p50_ms: float = 0.0
    handover_max_ms: float = 0.0
    num_handovers: int = 0
    step_p50_ms: float = 0.0


class LoopTimings:
    def __init__(self) -> None:
        self._joined: dict[str, tuple[float, float]] = {}  # rid -> (received, flight seconds)
        self._handovers: deque[float] = deque(maxlen=_WINDOW)
        self._steps: deque[float] = deque(maxlen=_WINDOW)
        self.num_handovers = 0

    def prefill_arrived(self, request_id: str, sent_at: float) -> None:
        """A sequence joined the running batch; its first step will close the hand-over."""
        flight = max(0.0, time.time() - sent_at) if sent_at > 0 else 0.0
        self._joined[request_id] = (time.monotonic(), flight)

    def forget(self, request_id: str) -> None:
        self._joined.pop(request_id, None)

    def step_started(self, now: float) -> None:
        """Every joined sequence is in this step: the scheduler runs all running sequences
        first (one token each), so joining means being in the next step."""
        for received, flight in self._joined.values():
            self._handovers.append(flight + (now - received))
            self.num_handovers += 1
        self._joined.clear()

    def step_finished(self, seconds: float) -> None:
        self._steps.append(seconds)

    def summary(self) -> TimingSummary:
        h, s = list(self._handovers), list(self._steps)
        return TimingSummary(
            handover_p50_ms=1e3 * statistics.median(h) if h else 0.0,
            handover_max_ms=1e3 * max(h) if h else 0.0,
            num_handovers=self.num_handovers,
            step_p50_ms=1e3 * statistics.median(s) if s else 0.0,
        )


@dataclass(frozen=True)
class DecodeSnapshot:
    """What ``Status`` reports; built by the engine thread, read by gRPC threads as a whole."""

    num_total_blocks: int = 0
    num_free_blocks: int = 0
    num_running: int = 0
    num_waiting: int = 0  # waiting for a local prefill or for decode blocks
    num_leases: int = 0  # remote prefills in flight (blocks held for a prefill worker)
    num_preemptions: int = 0
    prompt_tokens_cached: int = 0
    prompt_tokens_computed: int = 0
    timings: TimingSummary = TimingSummary()
    integrity_error: str = ""  # BlockManager.check_integrity() when last idle; "" = fine
