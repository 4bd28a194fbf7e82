"""`python -m bench.kvtransfer --quick` on the CPU backends: every one moves the bytes (the
bench checks the destination), reports a bandwidth, and nccl says why it cannot run here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_over_every_cpu_backend(tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.kvtransfer", "--backend", "nixl,tcp,ucxx,mpi,nccl", "--device", "cpu",
         "--quick", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["backend"]: r for r in json.loads(out.read_text())["results"]}
    for backend in ("nixl", "tcp", "ucxx", "mpi"):
        r = results[backend]
        assert r["checksum_ok"], backend
        assert {row["mode"] for row in r["rows"]} == {"all", "layerwise"}
        assert all(row["median_GBps"] > 0 and row["descriptors"] == 32 for row in r["rows"]), r["rows"]
    if not torch.cuda.is_available():
        assert "GPU memory only" in results["nccl"]["skipped"]
    assert "backend" in proc.stdout and "median_GBps" in proc.stdout  # the combined table
