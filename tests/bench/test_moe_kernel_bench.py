"""`python -m bench.moe_kernel --quick`: the CPU smoke mode runs the kernel (interpreter) and writes its JSON."""

from __future__ import annotations

import json

import bench.common
from bench import moe_kernel


def test_quick_mode_checks_times_and_records(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path / "results")  # keep the repo's results clean
    payload = moe_kernel.main(["--quick", "--sweep", "--out", str(tmp_path / "copy")])
    rows = payload["rows"]
    assert [r["batch"] for r in rows] == [1, 4]
    for r in rows:
        assert r["rel_err"] <= moe_kernel.TOL
        assert 1 <= r["experts_hit"] <= 8 and r["triton_ms"] > 0 and r["loop_ms"] > 0 and r["best_ms"] > 0
    assert "triton_ms" in capsys.readouterr().out
    (saved,) = (tmp_path / "results").glob("moe_kernel-quick-*.json")
    assert json.loads(saved.read_text())["rows"] == json.loads(json.dumps(rows))
    assert (tmp_path / "copy" / saved.name).is_file()
