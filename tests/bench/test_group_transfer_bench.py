"""`python -m bench.group_transfer --quick` on CPU: every pairing's destination matches its source
and the table has a row per (backend, pairing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_moves_every_slice(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.group_transfer", "--quick", "--backend", "tcp", "--blocks", "4",
         "--repeats", "1", "--pairings", "1x1-2x1,2x1-1x2", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [written] = tmp_path.glob("group-transfer-*.json")
    rows = json.loads(written.read_text())["rows"]
    assert [(r["prefill"], r["decode"], r["ok"]) for r in rows] == [("1x1", "2x1", True), ("2x1", "1x2", True)]
    assert all(r["descriptors"] > 0 and r["GB/s"] > 0 for r in rows)
    Path(proc.stdout.strip().splitlines()[-1].removeprefix("wrote ")).unlink()  # not a result to keep
