"""The run's summary: throughput, latency percentiles and goodput, from the request records.

Definitions follow vLLM's ``benchmark_serving`` so numbers compare across tools: TTFT from send
to the first chunk with text; TPOT per request as (E2E - TTFT) / (output tokens - 1); ITL the gap
between successive text chunks, pooled over all requests (a chunk that carries several tokens is
one gap, as the user sees it); E2E from send to the end of the stream. Percentiles interpolate
linearly (numpy's default). Goodput counts the successful requests per second that met every
given target (DistServe's definition); a request with one output token has no TPOT and so
meets any TPOT target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bench.serving.record import RequestRecord

PERCENTILES = (50, 90, 99)
GOODPUT_KEYS = ("ttft", "tpot", "e2e")


class GoodputError(ValueError):
    """A ``--goodput`` item that is not ``ttft:MS``, ``tpot:MS`` or ``e2e:MS``."""


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """``["ttft:1000", "tpot:40"]`` -> ``{"ttft": 1000.0, "tpot": 40.0}`` (milliseconds)."""
    targets: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = math.nan
        if not sep or key not in GOODPUT_KEYS or not ms > 0:
            raise GoodputError(f"--goodput: expected KEY:MS with KEY in {'/'.join(GOODPUT_KEYS)} and MS > 0, "
                               f"got {item!r}")
        targets[key] = ms
    return targets


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile with linear interpolation between closest ranks; None when empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """Mean and the reported percentiles of seconds, in milliseconds."""
    ms = [v * 1e3 for v in values_s]
    out: dict[str, float | None] = {"mean": sum(ms) / len(ms) if ms else None}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(ms, q)
    return out


def meets(record: RequestRecord, targets: dict[str, float]) -> bool:
    """Whether a request succeeded within every target (milliseconds)."""
    if not record.ok:
        return False
    got = {"ttft": record.ttft, "tpot": record.tpot, "e2e": record.latency}
    return all(got[k] is None or got[k] * 1e3 <= ms for k, ms in targets.items())


def summarize(records: Sequence[RequestRecord], duration_s: float, goodput: dict[str, float] | None = None
              ) -> dict[str, Any]:
    """The summary of a run that took ``duration_s`` from its first send to its last answer."""
    ok = [r for r in records if r.ok]
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.input_len for r in ok)
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    summary: dict[str, Any] = {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": errors,
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) * per_s,
        "input_throughput": in_tokens * per_s,
        "output_throughput": out_tokens * per_s,
        "ttft_ms": distribution_ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": distribution_ms([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": distribution_ms([g for r in ok for g in r.itls]),
        "e2e_ms": distribution_ms([r.latency for r in ok if r.latency is not None]),
    }
    if goodput:
        good = sum(meets(r, goodput) for r in records)
        summary["goodput"] = {
            "targets_ms": dict(goodput),
            "requests": good,
            "request_throughput": good * per_s,
            "fraction": good / len(records) if records else 0.0,
        }
    return summary
