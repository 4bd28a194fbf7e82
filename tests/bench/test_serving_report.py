"""`splitserve bench` results: JSON round trip, ``--compare``, and the command's failure modes
that need no server (bad flags, bad result files, a server that is not there)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from bench.serving.cli import main
from bench.serving.metrics import summarize
from bench.serving.record import RequestRecord
from bench.serving.report import (
    ResultFileError,
    build_result,
    format_compare,
    format_summary,
    load_result,
    save_result,
)


def _result(throughput_scale: float, ttft: float) -> dict:
    recs = []
    for i in range(4):
        r = RequestRecord(index=i, input_len=16, output_len=8, ok=True, ttft=ttft, latency=ttft + 0.7,
                          output_tokens=8, output_tokens_from="usage")
        r.chunk_times = [ttft + 0.1 * k for k in range(8)]
        recs.append(r)
    summary = summarize(recs, duration_s=2.0 / throughput_scale, goodput={"ttft": 250.0})
    return build_result({"base_url": "http://x", "model": "m", "endpoint": "completions", "load": "l"}, summary, recs)


def test_result_round_trips_through_json(tmp_path: Path) -> None:
    res = _result(1.0, 0.2)
    path = save_result(res, tmp_path / "sub" / "r.json")
    back = load_result(path)
    assert back == json.loads(json.dumps(res))
    assert back["version"] == 1 and back["date"] and "hostname" in back["host"]
    assert back["commit"]  # the test runs inside the git checkout
    assert back["requests"][0]["ttft_ms"] == 200.0 and len(back["requests"][0]["itl_ms"]) == 7
    table = format_summary(back)
    assert "requests/s" in table and "TTFT p99 (ms)" in table and "goodput (req/s)" in table


def test_compare_prints_both_sides_and_ratios() -> None:
    a, b = _result(1.0, 0.2), _result(2.0, 0.3)
    text = format_compare(a, b, ("a.json", "b.json"))
    lines = {line.split("  ")[0].strip(): line for line in text.splitlines()}
    assert "a.json" in text.splitlines()[0] and "b.json" in text.splitlines()[0]
    assert lines["requests/s"].split()[-1] == "2.000*"   # twice the throughput: better
    assert lines["TTFT p50 (ms)"].split()[-1] == "1.500"  # slower first token: no star
    assert lines["goodput fraction"].split()[-1] == "0.000"  # a met the 250 ms target, b did not


def test_compare_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pa, pb = save_result(_result(1.0, 0.2), tmp_path / "a.json"), save_result(_result(1.5, 0.2), tmp_path / "b.json")
    assert main(["--compare", str(pa), str(pb)]) == 0
    assert "1.500*" in capsys.readouterr().out
    (tmp_path / "junk.json").write_text('{"hello": 1}')
    assert main(["--compare", str(pa), str(tmp_path / "junk.json")]) == 2
    assert "not a `splitserve bench` results file" in capsys.readouterr().err
    with pytest.raises(ResultFileError, match="cannot read"):
        load_result(tmp_path / "missing.json")


@pytest.mark.parametrize(("argv", "message"), [
    (["--input-len-range", "9:3"], "--input-len-range"),
    (["--request-rate", "0"], "--request-rate"),
    (["--concurrency", "0"], "--concurrency"),
    (["--goodput", "ttft=5"], "--goodput"),
    (["--num-prompts", "0"], "--num-prompts"),
    (["--extra-body", "[1]"], "--extra-body"),
])
def test_bad_flags_fail_fast_with_a_named_error(argv: list[str], message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--base-url", "http://127.0.0.1:9", "--model", "m", *argv]) == 2
    assert message in capsys.readouterr().err


def test_unreachable_server_is_counted_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "r.json"
    argv = ["--base-url", f"http://127.0.0.1:{port}/v1", "--model", "m", "--num-prompts", "3",
            "--input-len", "8", "--output-len", "4", "--no-progress", "--out", str(out)]
    assert main([*argv, "--warmup", "0"]) == 1
    res = load_result(out)
    assert res["summary"]["failed"] == 3 and res["summary"]["completed"] == 0
    assert res["config"]["base_url"] == f"http://127.0.0.1:{port}"
    assert all(r["error"] for r in res["requests"])
    assert "error x3" in capsys.readouterr().out
    assert main([*argv, "--warmup", "1"]) == 1
    assert "every warm-up request failed" in capsys.readouterr().err
