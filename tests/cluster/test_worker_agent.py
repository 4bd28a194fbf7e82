"""`WorkerAgent` and `KVEventRelay` against a real redis-server: registration, heartbeats, KV
event relay, recovery after a lapsed lease or a Redis outage, deregistration, parent death."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from cluster.redis_server import EmbeddedRedis
from engine.block_manager import KVEvent as EngineEvent
from protocol.control_plane import ControlPlane
from protocol.registry import KVEvent, LoadSnapshot, WorkerInfo
from worker_runtime.agent import (
    PARENT_PID_ENV,
    REDIS_URL_ENV,
    REGISTRY_TTL_ENV,
    KVEventRelay,
    WorkerAgent,
    attach_worker_agent,
    load_from_snapshot,
)


@pytest.fixture
def cp(server: EmbeddedRedis, request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    plane = ControlPlane.from_url(server.url, namespace=f"t-{request.node.name}", ttl_s=1.0)
    yield plane
    plane.close()


def _info(wid: str = "p0") -> WorkerInfo:
    return WorkerInfo(wid, "prefill", "127.0.0.1:5000", num_blocks=100, block_size=16)


class Load:
    def __init__(self) -> None:
        self.free = 100

    def __call__(self) -> LoadSnapshot:
        return LoadSnapshot(free_blocks=self.free, total_blocks=100)


def _wait(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def _events(cp: ControlPlane, worker_id: str) -> list[KVEvent]:
    _, batches = cp.read_kv_events("0-0")
    return [e for b in batches if b.worker_id == worker_id for e in b.events]


def _agent(cp: ControlPlane, relay: KVEventRelay, load: Load | None = None, **kw: Any) -> WorkerAgent:
    return WorkerAgent(cp, _info(), load or Load(), relay.drain, heartbeat_s=0.2, tick_s=0.01, **kw)


def test_relay_converts_engine_events_in_order_across_threads() -> None:
    relay = KVEventRelay()
    relay.push([EngineEvent("stored", (1, 2), None), EngineEvent("removed", (2,))])
    assert relay.drain() == [KVEvent("stored", (1, 2)), KVEvent("removed", (2,))]
    assert relay.drain() == []

    def engine_thread() -> None:
        for i in range(2000):
            relay.push([EngineEvent("stored", (i,), None)])

    t = threading.Thread(target=engine_thread)
    t.start()
    got: list[KVEvent] = []
    while t.is_alive():
        got += relay.drain()
    t.join()
    got += relay.drain()
    assert [e.block_hashes[0] for e in got] == list(range(2000))


def test_registers_heartbeats_and_relays_events(cp: ControlPlane) -> None:
    relay, load = KVEventRelay(), Load()
    agent = _agent(cp, relay, load).start()
    try:
        assert _wait(lambda: [w.worker_id for w in cp.list_workers()] == ["p0"])
        relay.push([EngineEvent("stored", (11, 12, 13), None)])
        relay.push([EngineEvent("removed", (13,))])
        want = [KVEvent("stored", (11, 12, 13)), KVEvent("removed", (13,))]
        assert _wait(lambda: _events(cp, "p0")[-2:] == want)
        load.free = 42  # a load change is published before the next regular beat
        assert _wait(lambda: (cp.get_load("p0") or LoadSnapshot()).free_blocks == 42, timeout=1.0)
        time.sleep(1.5)  # past the 1 s TTL: still registered thanks to the heartbeats
        assert [w.worker_id for w in cp.list_workers()] == ["p0"]
        assert agent.cached_hashes == {11, 12}
    finally:
        agent.stop()
    assert cp.list_workers() == []
    assert _events(cp, "p0")[-1] == KVEvent("cleared")


def test_lapsed_lease_reregisters_and_republishes_the_cache(cp: ControlPlane) -> None:
    relay = KVEventRelay()
    agent = _agent(cp, relay).start()
    try:
        relay.push([EngineEvent("stored", (1, 2, 3), None), EngineEvent("removed", (3,))])
        assert _wait(lambda: agent.cached_hashes == {1, 2})
        assert _wait(lambda: len(_events(cp, "p0")) >= 2)
        n = len(_events(cp, "p0"))
        cp.client.delete(cp._worker_key("p0"))  # as if the lease had expired
        assert _wait(lambda: len(_events(cp, "p0")) >= n + 2)
        cleared, stored = _events(cp, "p0")[n : n + 2]
        assert cleared == KVEvent("cleared")
        assert stored.kind == "stored" and set(stored.block_hashes) == {1, 2}
        assert [w.worker_id for w in cp.list_workers()] == ["p0"]
    finally:
        agent.stop()


def test_survives_a_redis_outage_and_resynchronizes() -> None:
    first = EmbeddedRedis().start()
    port = first.port
    plane = ControlPlane.from_url(first.url, ttl_s=1.0)
    relay = KVEventRelay()
    agent = _agent(plane, relay).start()
    second = None
    try:
        assert _wait(lambda: plane.list_workers() != [])
        first.stop()
        relay.push([EngineEvent("stored", (5, 6), None)])  # relayed while Redis is down: not lost
        time.sleep(0.3)
        assert agent._thread.is_alive()
        second = EmbeddedRedis(port=port, password=first.password).start()  # an empty store, as after a restart
        assert _wait(lambda: [w.worker_id for w in plane.list_workers()] == ["p0"], timeout=10)
        assert _wait(lambda: any(e.kind == "stored" and set(e.block_hashes) == {5, 6}
                                 for e in _events(plane, "p0")))
    finally:
        agent.stop()
        plane.close()
        if second is not None:
            second.stop()


def test_parent_death_stops_the_worker(cp: ControlPlane) -> None:
    died = threading.Event()
    agent = _agent(cp, KVEventRelay(), parent_pid=os.getppid() + 1_000_000, on_parent_death=died.set).start()
    assert died.wait(2.0)
    agent.stop()


@dataclass
class FakeWorker:
    worker_id: str = "decode-7"
    address: str = "127.0.0.1:6000"
    agent_name: str = "decode-7"
    stops: list[Callable[[], None]] = field(default_factory=list)

    def on_stop(self, fn: Callable[[], None]) -> None:
        self.stops.append(fn)


def test_attach_worker_agent(server: EmbeddedRedis) -> None:
    worker = FakeWorker()
    kw: dict[str, Any] = dict(pool="decode", num_blocks=64, block_size=16, load=Load(),
                              kv_events=KVEventRelay(), max_num_seqs=8, transport={"backend": "tcp"})
    assert attach_worker_agent(worker, environ={}, **kw) is None and worker.stops == []
    env = {REDIS_URL_ENV: server.url, REGISTRY_TTL_ENV: "2", PARENT_PID_ENV: str(os.getppid())}
    agent = attach_worker_agent(worker, environ=env, **kw)
    assert agent is not None and len(worker.stops) == 1
    plane = ControlPlane.from_url(server.url)
    try:
        assert _wait(lambda: [w.worker_id for w in plane.list_workers("decode")] == ["decode-7"])
        info = plane.list_workers("decode")[0]
        assert info.address == "127.0.0.1:6000" and info.num_blocks == 64 and info.max_num_seqs == 8
        assert info.transport == {"agent_name": "decode-7", "backend": "tcp"}
        worker.stops[0]()  # the worker's stop deregisters at once
        assert plane.list_workers("decode") == []
    finally:
        plane.close()


def test_load_from_snapshot() -> None:
    @dataclass
    class Snap:
        num_total_blocks: int = 10
        num_free_blocks: int = 4
        num_running: int = 2
        num_waiting: int = 3
        queued_prefill_tokens: int = 99

    load = load_from_snapshot(Snap())
    assert (load.total_blocks, load.free_blocks, load.running_requests, load.queued_requests,
            load.queued_prefill_tokens) == (10, 4, 2, 3, 99)


def test_heartbeat_interval_must_fit_the_ttl_several_times(cp: ControlPlane) -> None:
    with pytest.raises(ValueError, match=r"^heartbeat_s: must be at most 1/3 of the registry TTL \(1s\), got 0.5s"):
        WorkerAgent(cp, _info(), Load(), KVEventRelay().drain, heartbeat_s=0.5)
    WorkerAgent(cp, _info(), Load(), KVEventRelay().drain, heartbeat_s=1 / 3)


def test_stays_registered_while_the_relay_is_stuck_and_the_cpu_is_hogged(server: EmbeddedRedis) -> None:
    """The relay blocked for 3 TTLs (a huge event batch on a slow Redis) while a pure-Python
    thread hogs the interpreter in 50 ms slices (ten times Python's default: an engine loop
    that rarely lets go of the GIL): the heartbeat thread still renews the 2 s lease, so the
    worker never expires. (Before it had a thread of its own, a stuck relay stopped the beats.)"""
    cp = ControlPlane.from_url(server.url, namespace="t-hog", ttl_s=2.0)
    stuck, release = threading.Event(), threading.Event()
    relay = KVEventRelay()

    def drain() -> list[KVEvent]:
        if agent._synced and not release.is_set():
            stuck.set()
            release.wait(6.0)
        return relay.drain()

    agent = WorkerAgent(cp, _info(), Load(), drain, heartbeat_s=0.4, tick_s=0.01)
    stop_hog = threading.Event()

    def hog() -> None:
        while not stop_hog.is_set():
            sum(i * i for i in range(20_000))

    agent.start()
    hogger = threading.Thread(target=hog)
    previous = sys.getswitchinterval()
    try:
        assert stuck.wait(5.0)
        sys.setswitchinterval(0.05)
        hogger.start()
        beats, missing = agent.beats, 0
        deadline = time.monotonic() + 6.0  # three TTLs
        while time.monotonic() < deadline:
            if [w.worker_id for w in cp.list_workers()] != ["p0"]:
                missing += 1
            time.sleep(0.1)
        assert missing == 0
        assert agent.beats >= beats + 5  # beats went on while the agent thread was stuck
    finally:
        sys.setswitchinterval(previous)
        stop_hog.set()
        release.set()
        if hogger.is_alive():
            hogger.join()
        agent.stop()
        cp.close()
