"""Metric definitions of `splitserve bench`: percentiles, TPOT, ITL, throughput and goodput."""

from __future__ import annotations

import random

import numpy as np
import pytest

from bench.serving.metrics import GoodputError, meets, parse_goodput, percentile, summarize
from bench.serving.record import RequestRecord


def _rec(i: int, ttft: float, latency: float, tokens: int, chunks: list[float] | None = None,
         input_len: int = 10) -> RequestRecord:
    r = RequestRecord(index=i, input_len=input_len, output_len=tokens, ok=True, ttft=ttft, latency=latency,
                      output_tokens=tokens, output_tokens_from="usage")
    r.chunk_times = chunks if chunks is not None else [ttft]
    return r


def _failed(i: int, error: str) -> RequestRecord:
    return RequestRecord(index=i, input_len=10, output_len=5, error=error)


def test_percentile_matches_numpy_linear() -> None:
    rng = random.Random(3)
    for n in (1, 2, 7, 100):
        xs = [rng.uniform(0, 50) for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


def test_tpot_excludes_first_token_and_needs_two() -> None:
    assert _rec(0, ttft=0.1, latency=1.0, tokens=10).tpot == pytest.approx(0.1)
    assert _rec(0, ttft=0.1, latency=0.1, tokens=1).tpot is None
    assert _failed(0, "x").tpot is None


def test_itl_is_gap_between_text_chunks() -> None:
    r = _rec(0, ttft=0.1, latency=0.3, tokens=3, chunks=[0.1, 0.15, 0.3])
    assert r.itls == pytest.approx([0.05, 0.15])
    assert r.to_json()["itl_ms"] == [50.0, 150.0]
    assert r.to_json()["tpot_ms"] == 100.0


def test_summary_counts_only_successes_and_groups_errors() -> None:
    recs = [
        _rec(0, 0.1, 1.0, 10, [0.1 + 0.1 * k for k in range(10)], input_len=20),
        _rec(1, 0.3, 2.1, 10, [0.3 + 0.2 * k for k in range(10)], input_len=30),
        _failed(2, "HTTP 400: bad"), _failed(3, "HTTP 400: bad"), _failed(4, "timeout"),
    ]
    s = summarize(recs, duration_s=2.0)
    assert (s["requests"], s["completed"], s["failed"]) == (5, 2, 3)
    assert s["errors"] == {"HTTP 400: bad": 2, "timeout": 1}
    assert s["request_throughput"] == 1.0
    assert s["output_throughput"] == 10.0  # 20 tokens / 2 s
    assert s["input_throughput"] == 25.0
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert s["tpot_ms"]["p50"] == pytest.approx(150.0)  # 100 and 200 ms
    assert s["itl_ms"]["p90"] == pytest.approx(200.0)  # 9 gaps of 100 ms, 9 of 200 ms
    assert s["e2e_ms"]["p99"] == pytest.approx(1000 + 0.99 * 1100)
    assert "goodput" not in s


def test_goodput_counts_requests_meeting_every_target() -> None:
    recs = [
        _rec(0, ttft=0.2, latency=0.2 + 9 * 0.03, tokens=10),   # ttft 200, tpot 30: meets both
        _rec(1, ttft=0.9, latency=0.9 + 9 * 0.03, tokens=10),   # ttft too slow
        _rec(2, ttft=0.2, latency=0.2 + 9 * 0.05, tokens=10),   # tpot too slow
        _rec(3, ttft=0.3, latency=0.3, tokens=1),               # no tpot: meets it
        _failed(4, "boom"),
    ]
    targets = parse_goodput(["ttft:500", "tpot:40"])
    assert [meets(r, targets) for r in recs] == [True, False, False, True, False]
    g = summarize(recs, duration_s=4.0, goodput=targets)["goodput"]
    assert g["requests"] == 2 and g["request_throughput"] == 0.5 and g["fraction"] == 0.4
    assert g["targets_ms"] == {"ttft": 500.0, "tpot": 40.0}


@pytest.mark.parametrize("bad", ["ttft", "ttft:", "ttft:x", "tpot:-1", "latency:5", "ttft:0"])
def test_goodput_rejects_malformed_targets(bad: str) -> None:
    with pytest.raises(GoodputError, match="--goodput"):
        parse_goodput([bad])
