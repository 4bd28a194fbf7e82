"""`RequestRecord`: what one request did, the unit every metric and the JSON report are built from.

Kept apart from the HTTP client so metrics, reports and ``--compare`` need no HTTP stack.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    """One request's timeline; times in seconds, ``send`` from the run's start, the others from ``send``."""

    index: int
    input_len: int
    output_len: int  # requested
    send: float = 0.0
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    latency: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk that carried text
    output_tokens: int = 0
    output_tokens_from: str = "none"  # "usage" (the server said) or "tokenizer" (counted here)
    prompt_tokens: int | None = None  # the server's count, when it sends usage
    text: str = ""

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.chunk_times)]

    @property
    def tpot(self) -> float | None:
        """Decode time per output token after the first (vLLM's definition); None below two tokens."""
        if not self.ok or self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        """The record as saved: times in milliseconds, rounded to microseconds; the text left out."""
        d = asdict(self)
        d.pop("text")
        d.pop("chunk_times")
        for key in ("send", "ttft", "latency"):
            d[f"{key}_ms"] = _ms(d.pop(key))
        d["tpot_ms"] = _ms(self.tpot)
        d["itl_ms"] = [_ms(g) for g in self.itls]
        return d


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)
