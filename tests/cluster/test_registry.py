"""The Redis control plane against a real redis-server (started per module, on a free port)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import redis

from cluster.config import load_config
from cluster.redis_server import EmbeddedRedis, open_control_plane
from protocol.control_plane import ControlPlane
from protocol.registry import KVEvent, LoadSnapshot, WorkerInfo


@pytest.fixture
def cp(server: EmbeddedRedis, request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    plane = ControlPlane.from_url(server.url, namespace=f"t-{request.node.name}", ttl_s=5.0)
    yield plane
    plane.close()


def _worker(wid: str, pool: str = "decode", blocks: int = 100) -> WorkerInfo:
    return WorkerInfo(
        wid, pool, f"10.0.0.1:{5000 + len(wid)}", num_blocks=blocks, block_size=16, max_num_seqs=32,
        transport={"backend": "nixl", "agent": f"agent-{wid}", "metadata": b"\x00\xffblob"},
    )  # fmt: skip


def test_embedded_server_lifecycle() -> None:
    r = EmbeddedRedis().start()
    url = r.url
    assert redis.Redis.from_url(url).ping()
    r.stop()
    assert not r.running
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()


def test_open_embedded_control_plane() -> None:
    with open_control_plane(load_config(None).redis) as cp:
        cp.register_worker(_worker("d0"))
        assert [w.worker_id for w in cp.list_workers()] == ["d0"]
        port = cp.client.connection_pool.connection_kwargs["port"]
    with pytest.raises(OSError):  # the private server stopped with the context
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()


def test_register_and_list(cp: ControlPlane) -> None:
    d0, d1, p0 = _worker("d0"), _worker("d1", blocks=50), _worker("p0", "prefill")
    for w in (d1, p0, d0):
        cp.register_worker(w)
    assert cp.list_workers() == [d0, d1, p0]
    assert cp.list_workers("decode") == [d0, d1]
    assert cp.list_workers("prefill") == [p0]
    # a fresh worker reports an idle load until its first heartbeat
    load = cp.get_load("d1")
    assert load is not None and (load.free_blocks, load.total_blocks) == (50, 50)
    # transport metadata (bytes included) survives msgpack unchanged
    assert cp.list_workers("prefill")[0].transport["metadata"] == b"\x00\xffblob"


def test_heartbeat_updates_load(cp: ControlPlane) -> None:
    cp.register_worker(_worker("d0"))
    snap = LoadSnapshot(
        queued_requests=3, queued_prefill_tokens=900, running_requests=7, free_blocks=40, total_blocks=100
    )
    assert cp.heartbeat("d0", snap)
    [(info, load)] = cp.live_workers("decode")
    assert info.worker_id == "d0" and load == snap and load.kv_usage == pytest.approx(0.6)


def test_ttl_expiry_drops_dead_worker(server: EmbeddedRedis) -> None:
    cp = ControlPlane.from_url(server.url, namespace="t-ttl", ttl_s=0.6)
    cp.register_worker(_worker("alive"))
    cp.register_worker(_worker("dead"))
    for _ in range(8):  # "alive" keeps heart-beating past the TTL, "dead" stops
        time.sleep(0.1)
        assert cp.heartbeat("alive", LoadSnapshot(free_blocks=100, total_blocks=100))
    assert [w.worker_id for w in cp.list_workers()] == ["alive"]
    assert cp.get_load("dead") is None
    # the dead worker's next heartbeat tells it to re-register
    assert cp.heartbeat("dead", LoadSnapshot()) is False
    cp.register_worker(_worker("dead"))
    assert [w.worker_id for w in cp.list_workers()] == ["alive", "dead"]
    cp.close()


def test_deregister_and_pool_move(cp: ControlPlane) -> None:
    cp.register_worker(_worker("w"))
    cp.register_worker(_worker("w", "prefill"))
    assert cp.list_workers("decode") == [] and [w.pool for w in cp.list_workers()] == ["prefill"]
    cp.deregister_worker("w")
    assert cp.list_workers() == []


def test_kv_events_stream_round_trip(cp: ControlPlane) -> None:
    assert cp.read_kv_events("0-0") == ("0-0", [])
    big = 2**64 - 1  # engine hashes are unsigned 64-bit
    id1 = cp.publish_kv_events("d0", [KVEvent("stored", (1, 2, big))])
    id2 = cp.publish_kv_events("d1", [KVEvent("stored", (1,)), KVEvent("removed", (1,))])
    assert cp.publish_kv_events("d0", []) is None
    last, batches = cp.read_kv_events("0-0")
    assert last == id2 and [b.stream_id for b in batches] == [id1, id2]
    assert batches[0].worker_id == "d0" and batches[0].events == (KVEvent("stored", (1, 2, big)),)
    assert [e.kind for e in batches[1].events] == ["stored", "removed"]
    # tailing from the last id sees only what comes after it
    assert cp.read_kv_events(last) == (last, [])
    id3 = cp.publish_kv_events("d0", [KVEvent("cleared")])
    last2, batches = cp.read_kv_events(last, block_ms=100)
    assert last2 == id3 and batches[0].events == (KVEvent("cleared"),)
    # "$" skips history
    assert cp.read_kv_events("$") == (id3, [])


def test_kv_event_read_blocks_until_timeout(cp: ControlPlane) -> None:
    t = time.monotonic()
    assert cp.read_kv_events("0-0", block_ms=150)[1] == []
    assert time.monotonic() - t >= 0.1


def test_malformed_stream_entry_is_skipped(cp: ControlPlane) -> None:
    cp.client.xadd(cp._stream_key, {b"w": b"evil", b"e": b"\xc1not msgpack"})
    good = cp.publish_kv_events("d0", [KVEvent("stored", (7,))])
    last, batches = cp.read_kv_events("0-0")
    assert last == good and [b.worker_id for b in batches] == ["d0"]


def test_malformed_worker_record_is_not_live(cp: ControlPlane) -> None:
    cp.register_worker(_worker("good"))
    cp.client.set(cp._worker_key("bad"), b"\x93\x01\x02\x03")  # msgpack, but not a WorkerInfo
    cp.client.sadd(cp._pool_key("decode"), "bad")
    assert [w.worker_id for w in cp.list_workers()] == ["good"]


def test_pool_targets(cp: ControlPlane) -> None:
    assert cp.get_pool_target("prefill") is None
    cp.set_pool_target("prefill", 3)
    cp.set_pool_target("decode", 0)
    assert (cp.get_pool_target("prefill"), cp.get_pool_target("decode")) == (3, 0)
    with pytest.raises(ValueError, match="replicas"):
        cp.set_pool_target("decode", -1)
    with pytest.raises(ValueError, match="pool"):
        cp.set_pool_target("gpu", 1)  # type: ignore[arg-type]


def test_messages_reject_bad_pool() -> None:
    with pytest.raises(ValueError, match="pool"):
        WorkerInfo("x", "encode", "h:1", 1, 16)  # type: ignore[arg-type]
