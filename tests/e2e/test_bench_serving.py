"""`splitserve bench` against a real local cluster of the embedded model, as a user runs it.

Two short runs (completions at a concurrency of 2; chat with Poisson arrivals and a shared prefix)
through the real command in a subprocess, then ``--compare`` of their result files, and a run
against a model the server does not serve, whose failures are counted and reported, not raised.
The numbers are checked for sanity, not speed: every request answered, with exactly the requested
output tokens (``ignore_eos``) and the prompt length the server counted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from splitserve.serve import LocalCluster
from tests.e2e.harness import MODEL, make_config, running_cluster, wait_pools_full

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running_cluster(make_config(None), tmp_path_factory.mktemp("logs")) as c:
        yield c


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)


def _bench(cluster: LocalCluster, out: Path, *argv: str) -> tuple[int, dict[str, Any], str]:
    proc = _run("-m", "splitserve.cli", "bench", "--base-url", cluster.url, "--no-progress", "--out", str(out),
                "--num-prompts", "6", "--output-len", "8", *argv)
    assert out.is_file(), proc.stderr
    return proc.returncode, json.loads(out.read_text()), proc.stdout + proc.stderr


def _check_all_answered(res: dict[str, Any], input_len: int) -> None:
    s = res["summary"]
    assert (s["requests"], s["completed"], s["failed"]) == (6, 6, 0), s["errors"]
    for r in res["requests"]:
        assert r["ok"] and r["error"] is None
        assert r["output_tokens"] == 8 and r["output_tokens_from"] == "usage"  # ignore_eos: all 8
        assert r["prompt_tokens"] == r["input_len"] == input_len  # our count is the server's count
        assert 0 < r["ttft_ms"] <= r["latency_ms"] and r["tpot_ms"] > 0
        assert len(r["itl_ms"]) <= 7 and all(g >= 0 for g in r["itl_ms"])  # fewer if chunks carried several
    assert s["total_output_tokens"] == 48 and s["total_input_tokens"] == 6 * input_len
    assert s["output_throughput"] == pytest.approx(48 / s["duration_s"])
    assert s["request_throughput"] == pytest.approx(6 / s["duration_s"])
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        d = s[key]
        assert 0 <= d["p50"] <= d["p90"] <= d["p99"], key
    assert s["ttft_ms"]["p50"] > 0 and s["e2e_ms"]["p50"] >= s["ttft_ms"]["p50"] and s["itl_ms"]["p50"] is not None


def test_bench_runs_reports_and_compares(cluster: LocalCluster, tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    rc, res, log = _bench(cluster, a, "--input-len", "16", "--concurrency", "2", "--warmup", "1",
                          "--goodput", "ttft:600000", "tpot:600000")
    assert rc == 0, log
    _check_all_answered(res, 16)
    assert res["config"]["model"] == cluster.config.model_name  # asked from /v1/models
    assert res["summary"]["goodput"]["fraction"] == 1.0
    spans = [(r["send_ms"], r["send_ms"] + r["latency_ms"]) for r in res["requests"]]
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) <= 2, "concurrency cap of 2"
    assert "output tok/s" in log and "TTFT p99 (ms)" in log

    rc, res, log = _bench(cluster, b, "--model", MODEL, "--endpoint", "chat", "--input-len", "48",
                          "--shared-prefix", "8", "--num-groups", "2", "--request-rate", "20", "--seed", "3")
    assert rc == 0, log
    _check_all_answered(res, 48)  # the chat template's tokens included
    assert res["config"]["load"] == "poisson 20 req/s"
    sends = [r["send_ms"] for r in res["requests"]]
    assert sends == sorted(sends) and sends[-1] > 0

    proc = _run("-m", "bench.serving", "--compare", str(a), str(b))
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert "a.json" in header and "b.json" in header and "b/a" in header
    ratio = next(r for r in rows if r.startswith("output tok/s")).split()[-1].rstrip("*")
    assert float(ratio) > 0
    wait_pools_full(cluster)


def test_bench_counts_failed_requests(cluster: LocalCluster, tmp_path: Path) -> None:
    rc, res, log = _bench(cluster, tmp_path / "bad.json", "--model", "no-such-model", "--warmup", "0",
                          "--input-len", "16")
    assert rc == 1, log
    s = res["summary"]
    assert (s["completed"], s["failed"]) == (0, 6)
    [(error, count)] = s["errors"].items()
    assert count == 6 and error.startswith("HTTP 404") and "no-such-model" in error
    assert "error x6: HTTP 404" in log
