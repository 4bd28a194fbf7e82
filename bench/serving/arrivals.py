"""When each request is sent: a Poisson process, a constant rate, or as fast as a concurrency cap allows.

Send times are planned up front from a seeded generator, so two runs with the same seed offer the
same load whatever the server does; a concurrency cap (alone, or on top of a rate, as vLLM's
``--max-concurrency``) then holds a request back until a slot frees, which is the closed-loop
mode SGLang and vLLM call "fixed concurrency".
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal


class ArrivalError(ValueError):
    """An arrival schedule that makes no sense (a rate or concurrency below one)."""


@dataclass(frozen=True)
class Arrivals:
    """``rate`` requests/s (``inf``: all at once) drawn as ``process``, at most ``concurrency`` in flight."""

    rate: float = math.inf
    process: Literal["poisson", "constant"] = "poisson"
    concurrency: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ArrivalError(f"--request-rate must be > 0, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ArrivalError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.process not in ("poisson", "constant"):
            raise ArrivalError(f"--arrival must be poisson or constant, got {self.process!r}")

    def offsets(self, n: int) -> list[float]:
        """Seconds from the start at which each of ``n`` requests becomes due; the first at 0."""
        if math.isinf(self.rate):
            return [0.0] * n
        if self.process == "constant":
            return [i / self.rate for i in range(n)]
        rng = random.Random(self.seed)
        out, t = [], 0.0
        for _ in range(n):
            out.append(t)
            t += rng.expovariate(self.rate)
        return out

    def describe(self) -> str:
        rate = "all at once" if math.isinf(self.rate) else f"{self.process} {self.rate:g} req/s"
        return rate + (f", concurrency {self.concurrency}" if self.concurrency else "")
