"""`python -m bench.decode_speed --quick`: the CPU smoke mode runs every mode and writes its JSON."""

from __future__ import annotations

import json

import bench.common
from bench import decode_speed


def test_quick_mode_times_every_mode_and_records(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path / "results")  # keep the repo's results clean
    payload = decode_speed.main(["--quick", "--out", str(tmp_path / "copy")])
    rows = payload["decode"]
    assert [(r["mode"], r["batch"], r["context"]) for r in rows] == [
        (m, b, c) for m in decode_speed.MODES for b, c in decode_speed.QUICK.decode
    ]
    for r in rows:
        assert r["step_ms"] > 0 and r["floor_ms"] > 0 and r["tok_s"] == r["batch"] / (r["step_ms"] / 1e3)
    assert [(p["mode"], p["prompt"]) for p in payload["prefill"]] == [
        (m, n) for m in decode_speed.MODES for n in decode_speed.QUICK.prefill
    ]
    assert all(p["mfu"] > 0 for p in payload["prefill"])
    assert "step_ms" in capsys.readouterr().out
    (saved,) = (tmp_path / "results").glob("decode_speed-quick-*.json")
    assert json.loads(saved.read_text())["decode"] == json.loads(json.dumps(rows))
    assert (tmp_path / "copy" / saved.name).is_file()
