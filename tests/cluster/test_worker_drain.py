"""A worker sent `DRAIN_SIGNAL` is marked draining in the control plane at once but stays
registered and keeps serving (what a Ray Serve scale-down relies on: the router stops choosing
it, streams in flight finish on it), and still stops cleanly on SIGTERM afterwards."""

from __future__ import annotations

import os
import time
from pathlib import Path

from cluster.local_workers import WorkerProcess
from cluster.redis_server import EmbeddedRedis
from protocol.control_plane import ControlPlane
from protocol.decode_client import DecodeClient
from protocol.worker_spec import WorkerSpec
from router.dispatch import ClusterView
from worker_runtime.agent import REDIS_URL_ENV, REGISTRY_TTL_ENV
from worker_runtime.main import DRAIN_SIGNAL

TOKEN = "drain-test-token"


def _wait(cond, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_drained_worker_leaves_registry_keeps_serving_then_stops(
        server: EmbeddedRedis, smollm2_path: Path, tmp_path: Path) -> None:
    spec = WorkerSpec(role="decode", model=str(smollm2_path), worker_id="decode-drain", transport="tcp",
                      kv_cache_memory=16 * 2**20, num_threads=1)
    env = {**os.environ, REDIS_URL_ENV: server.url, REGISTRY_TTL_ENV: "3"}
    cp = ControlPlane.from_url(server.url, ttl_s=3.0, token=TOKEN)
    proc = WorkerProcess(spec, TOKEN, env=env, log_dir=tmp_path).start(timeout=180)
    try:
        _wait(lambda: "decode-drain" in {w.worker_id for w in cp.list_workers()})
        os.kill(proc.pid, DRAIN_SIGNAL)
        _wait(lambda: (load := cp.get_load("decode-drain")) is not None and load.draining)
        time.sleep(4.0)  # longer than the TTL: it keeps beating, draining
        assert "decode-drain" in {w.worker_id for w in cp.list_workers()}
        assert cp.get_load("decode-drain").draining
        assert proc.alive()
        with DecodeClient(proc.address, TOKEN) as client:
            assert client.status().worker_id == "decode-drain"  # still serving
        view = ClusterView(cp)
        view.update_workers(cp.live_workers())
        assert [w.worker_id for w in view.workers()] == ["decode-drain"]  # its streams keep their worker
        assert [w.worker_id for w in view.snapshot().decode] == []  # routed nothing new
        assert proc.stop(timeout=30) == 0
        assert "decode-drain" not in {w.worker_id for w in cp.list_workers()}  # a stopped worker deregisters
    finally:
        proc.kill()
        cp.close()
