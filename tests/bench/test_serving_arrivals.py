"""Arrival schedules of `splitserve bench`: Poisson statistics, determinism, constant rate."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest

from bench.serving.arrivals import ArrivalError, Arrivals


def test_poisson_gaps_have_the_requested_mean_and_spread() -> None:
    times = Arrivals(rate=4.0, process="poisson", seed=7).offsets(20000)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert times[0] == 0.0
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.05)  # exponential: std == mean
    assert all(g >= 0 for g in gaps)


def test_poisson_is_deterministic_per_seed() -> None:
    a = Arrivals(rate=10.0, seed=1).offsets(50)
    assert a == Arrivals(rate=10.0, seed=1).offsets(50)
    assert a != Arrivals(rate=10.0, seed=2).offsets(50)


def test_constant_rate_and_burst() -> None:
    assert Arrivals(rate=4.0, process="constant").offsets(4) == [0.0, 0.25, 0.5, 0.75]
    assert Arrivals(concurrency=3).offsets(3) == [0.0, 0.0, 0.0]
    assert "concurrency 3" in Arrivals(concurrency=3).describe()


@pytest.mark.parametrize("kw", [{"rate": 0.0}, {"rate": -1.0}, {"rate": math.nan}, {"concurrency": 0},
                                {"process": "bursty"}])
def test_bad_schedules_are_refused(kw: dict) -> None:
    with pytest.raises(ArrivalError):
        Arrivals(**kw)
