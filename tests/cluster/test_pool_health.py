"""The router's view says why it cannot serve as configured: a pool that had workers and has
none left (its last record expired or was removed) on a real Redis registry. Deterministic
here; the e2e kill -9 test cannot always see it, because a fast restart can re-register before
the dead incarnation's record expires."""

from __future__ import annotations

import asyncio

from cluster.redis_server import EmbeddedRedis
from protocol.control_plane import ControlPlane
from protocol.registry import WorkerInfo
from router.dispatch import ClusterView

TOKEN = "pool-health-token"


def test_a_pool_that_emptied_is_degraded_until_a_worker_registers(server: EmbeddedRedis) -> None:
    cp = ControlPlane.from_url(server.url, ttl_s=3.0, token=TOKEN)
    view = ClusterView(cp)
    try:
        asyncio.run(view.refresh())
        assert view.degraded() == ["no live decode worker"]  # configured with none yet
        cp.register_worker(WorkerInfo("d-1", "decode", "127.0.0.1:1", 64, 16))
        cp.register_worker(WorkerInfo("p-1", "prefill", "127.0.0.1:2", 64, 16))
        asyncio.run(view.refresh())
        assert view.degraded() == []
        cp.deregister_worker("p-1")  # the prefill pool had a worker: losing it is degraded
        asyncio.run(view.refresh())
        assert view.degraded() == ["no live prefill worker"]
        cp.deregister_worker("d-1")
        asyncio.run(view.refresh())
        assert view.degraded() == ["no live decode worker", "no live prefill worker"]
        cp.register_worker(WorkerInfo("d-2", "decode", "127.0.0.1:3", 64, 16))  # a restarted incarnation
        cp.register_worker(WorkerInfo("p-2", "prefill", "127.0.0.1:4", 64, 16))
        asyncio.run(view.refresh())
        assert view.degraded() == []
    finally:
        cp.close()
