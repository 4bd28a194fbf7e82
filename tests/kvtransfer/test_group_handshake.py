"""The group handshake and completion: a prefill group's rank 0 takes a decode group's bundle,
or refuses it naming both shapes (what `PrefillKVConnector` answers decode with), and notifies
decode only once every rank's writes landed. Real TCP transports (groups of
one rank: the followers' side of the handshake is the same `RankKV.add_group`)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from engine.kv_cache_pool import KVCachePool, KVLayout
from kvtransfer.base import TransportOptions
from kvtransfer.errors import TransferFailedError, TransferTimeoutError
from kvtransfer.group_bundle import GroupBundle
from kvtransfer.group_slices import GroupShape
from kvtransfer.tcp_backend import TcpTransport
from prefill_worker.connector import PrefillKVConnector
from protocol.errors import PeerAuthError, ProtocolError
from worker_runtime.group_transport import GroupTransport
from worker_runtime.rank_kv import TIMED_OUT, OpenRankTransport, Push

TOKEN = "tok"


def open_group(name: str, shape: GroupShape, compat: dict | None = None) -> GroupTransport:
    s = shape.rank_slice(0)
    pool = KVCachePool(KVLayout(len(s.layers), 8, len(s.heads), shape.block_size, shape.head_dim, torch.float32))
    cmd = OpenRankTransport("tcp", TransportOptions(token=TOKEN), name, compat or {"model": "m"}, shape, 5.0)
    own = cmd.open(pool, 0)
    return GroupTransport(own, None, [own.transport.metadata()])


@pytest.fixture
def opened() -> Iterator[list[GroupTransport]]:
    made: list[GroupTransport] = []
    yield made
    for t in made:
        t.close()


def shape(block_size: int = 4) -> GroupShape:
    return GroupShape(1, 1, 2, 2, 8, block_size, "torch.float32")


def test_a_compatible_group_is_added_under_its_rank0_name(opened: list) -> None:
    prefill, decode = open_group("p", shape()), open_group("d", shape())
    opened += [prefill, decode]
    assert prefill.add_peer(decode.metadata()) == "d" and prefill.peers == ["d"]
    assert isinstance(prefill.inner, TcpTransport) and prefill.inner.peers == ["d"]
    prefill.remove_peer("d")
    assert prefill.peers == [] and prefill.inner.peers == []


def test_a_pairing_that_cannot_work_is_refused_naming_both_shapes(opened: list) -> None:
    prefill, decode = open_group("p", shape(4)), open_group("d", shape(8))
    opened += [prefill, decode]
    conn = PrefillKVConnector(prefill, KVLayout(2, 8, 2, 4, 8, torch.float32), torch.device("cpu"))
    refused, failed = conn.add_peer("d", decode.metadata())
    assert failed == []
    assert "prefill group tp=1 pp=1 (2 layers, 2 KV heads, head_dim 8, block_size 4" in refused
    assert "decode group tp=1 pp=1 (2 layers, 2 KV heads, head_dim 8, block_size 8" in refused
    assert "block_size differ" in refused
    assert prefill.inner.peers == []  # nothing connected


def test_single_worker_metadata_and_forged_bundles_are_refused(opened: list) -> None:
    prefill, decode = open_group("p", shape()), open_group("d", shape())
    opened += [prefill, decode]
    with pytest.raises(ProtocolError, match="single-worker KV metadata"):
        prefill.add_peer(decode.inner.metadata())
    forged = GroupBundle("d", GroupShape(2, 1, 2, 2, 8, 4, "torch.float32"), [decode.inner.metadata()] * 2)
    with pytest.raises(PeerAuthError):
        prefill.add_peer(forged.encode("not-the-token"))


def test_other_weights_are_refused_by_the_transport_key(opened: list) -> None:
    prefill, decode = open_group("p", shape()), open_group("d", shape(), {"model": "other"})
    opened += [prefill, decode]
    with pytest.raises(Exception, match="model"):
        prefill.add_peer(decode.metadata())


def _notes(t: GroupTransport, timeout: float = 5.0) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = [m for _, m in t.poll_notifications()]
        if got:
            return got
        time.sleep(0.01)
    return []


def test_decode_is_notified_only_when_every_rank_landed(opened: list) -> None:
    """Rank 0's write carries the notification; it goes out once rank 0's bytes landed and no
    follower reported an error for that peer (the followers report after their own writes landed)."""
    prefill, decode = open_group("p", shape()), open_group("d", shape())
    opened += [prefill, decode]
    prefill.add_peer(decode.metadata())
    prefill.begin_step([Push("d", [1, 2], [3, 4])])
    assert [p.peer for p in prefill.orders() or []] == ["d"] and prefill.orders() is None  # handed out once
    prefill.collect([None, {}])  # rank 1 wrote its slices and they landed
    h = prefill.write_blocks("d", [1, 2], [3, 4], layers=[1], notify=b"first-token")
    prefill.wait(h, 5.0)
    assert _notes(decode) == [b"first-token"]

    prefill.begin_step([Push("d", [5], [6])])
    prefill.collect([None, {"d": "rank 1: connection lost"}])
    h = prefill.write_blocks("d", [5], [6], layers=[1], notify=b"never")
    with pytest.raises(TransferFailedError, match="rank 1: connection lost"):
        prefill.wait(h, 5.0)
    assert _notes(decode, 0.3) == []  # decode's lease (or prefill's failure notice) frees its blocks

    prefill.begin_step([Push("d", [5], [6])])
    prefill.collect([None, {"d": f"{TIMED_OUT} rank 1: still in flight"}])
    h = prefill.write_blocks("d", [5], [6], layers=[1])
    with pytest.raises(TransferTimeoutError):  # the connector drops the whole peer group then
        prefill.wait(h, 5.0)
