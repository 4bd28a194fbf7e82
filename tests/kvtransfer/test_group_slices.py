"""Group-to-group KV writes over real TCP transports: every decode rank ends up holding exactly
its heads and layers of the prefill group's KV, whatever the two splits.

Each rank is a `TcpTransport` with its own pool (threads of this process talking over loopback
sockets); the reference is one whole-model KV tensor that the prefill ranks' pools are cut from.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from engine.kv_cache_pool import KVCachePool, KVLayout
from kvtransfer import create_transport
from kvtransfer.base import KVTransport, TransportOptions
from kvtransfer.group_slices import GroupPairingError, GroupShape, check_pairing, pieces, slice_ranges

LAYERS, KV_HEADS, BS, HD = 4, 2, 4, 8
COMPAT = {"model": "tiny", "kv.layers": LAYERS, "kv.heads": KV_HEADS}


def shape(tp: int, pp: int) -> GroupShape:
    return GroupShape(tp, pp, LAYERS, KV_HEADS, HD, BS, "torch.float32")


def rank_pool(g: GroupShape, rank: int, num_blocks: int) -> KVCachePool:
    s = g.rank_slice(rank)
    return KVCachePool(KVLayout(len(s.layers), num_blocks, len(s.heads), BS, HD, torch.float32))


Group = list[tuple[KVTransport, KVCachePool]]


def start_group(g: GroupShape, name: str, num_blocks: int, backend: str = "tcp") -> Group:
    out = []
    for r in range(g.world_size):
        pool = rank_pool(g, r, num_blocks)
        t = create_transport(backend, f"{name}-{r}", TransportOptions(token="t"))
        t.register_pool(pool, COMPAT, group=True)
        out.append((t, pool))
    return out


@pytest.fixture
def groups() -> Iterator[list[list[tuple[KVTransport, KVCachePool]]]]:
    made: list[list[tuple[KVTransport, KVCachePool]]] = []
    yield made
    for group in made:
        for t, _ in group:
            t.close()


PAIRINGS = [((1, 1), (2, 1)), ((2, 1), (1, 1)), ((1, 2), (2, 1)), ((2, 1), (1, 2)), ((4, 1), (1, 2)),
            ((1, 1), (4, 1)), ((2, 2), (4, 1))]


@pytest.mark.parametrize("backend", ["tcp", "ucxx"])
@pytest.mark.parametrize(("src", "dst"), PAIRINGS, ids=lambda p: f"tp{p[0]}pp{p[1]}")
def test_every_decode_rank_gets_its_slice(
    src: tuple[int, int], dst: tuple[int, int], backend: str, groups: list
) -> None:
    pg, dg = shape(*src), shape(*dst)
    check_pairing(pg, dg)
    torch.manual_seed(0)
    whole = torch.randn(LAYERS, 10, 2, KV_HEADS, BS, HD)  # the model's KV at prefill block ids 0..9
    prefill = start_group(pg, "p", 10, backend)
    groups.append(prefill)
    decode = start_group(dg, "d", 12, backend)
    groups.append(decode)
    for r, (_, pool) in enumerate(prefill):
        s = pg.rank_slice(r)
        pool.kv.copy_(whole[s.layers.start:s.layers.stop, :, :, s.heads.start:s.heads.stop])
    local, remote = np.array([3, 4, 5, 9]), np.array([11, 2, 3, 0])  # a run, a jump, descending
    for s_rank, d_rank in pieces(pg, dg):
        t, pool = prefill[s_rank]
        t.add_peer(decode[d_rank][0].metadata())
        ranges = slice_ranges(pg, s_rank, dg, d_rank, local, remote, np.arange(LAYERS), 10, 12)
        t.wait(t.write_ranges(decode[d_rank][0].agent_name, ranges), 10)
    for d_rank, (_, pool) in enumerate(decode):
        s = dg.rank_slice(d_rank)
        want = whole[s.layers.start:s.layers.stop][:, local][:, :, :, s.heads.start:s.heads.stop]
        torch.testing.assert_close(pool.kv[:, remote], want, rtol=0, atol=0)
        untouched = np.setdiff1d(np.arange(12), remote)
        assert not pool.kv[:, untouched].any(), "bytes landed outside the paired blocks"


def test_replicated_heads_are_written_once() -> None:
    """tp=4 over 2 KV heads: ranks 1 and 3 hold copies and write nothing."""
    assert sorted({s for s, _ in pieces(shape(4, 1), shape(1, 1))}) == [0, 2]
    assert pieces(shape(1, 1), shape(4, 1)) == [(0, 0), (0, 1), (0, 2), (0, 3)]


def test_whole_blocks_merge_into_one_range_per_run() -> None:
    """Same split: K and V of consecutive blocks touch, so a run of one layer is one descriptor."""
    r = slice_ranges(shape(2, 1), 0, shape(2, 1), 0, np.array([1, 2, 3]), np.array([5, 6, 7]),
                     np.array([0]), 10, 12)
    assert len(r) == 1 and r.total_bytes == 3 * 2 * BS * HD * 4


def test_pairing_refused_naming_both_shapes() -> None:
    other = GroupShape(2, 1, LAYERS, KV_HEADS, HD * 2, BS, "torch.float32")
    with pytest.raises(GroupPairingError, match=r"tp=1 pp=1 .*tp=2 pp=1 .*head_dim differ"):
        check_pairing(shape(1, 1), other)
    with pytest.raises(GroupPairingError, match="decode split does not fit"):
        check_pairing(shape(1, 1), shape(3, 1))
    with pytest.raises(GroupPairingError, match="more pipeline stages than layers"):
        check_pairing(shape(1, 5), shape(1, 1))


def test_off_tile_ranges_are_refused_before_sending(groups: list) -> None:
    prefill, decode = start_group(shape(1, 1), "p", 4), start_group(shape(1, 1), "d", 4)
    groups += [prefill, decode]
    t = prefill[0][0]
    t.add_peer(decode[0][0].metadata())
    from kvtransfer.descriptors import ByteRanges

    bad = ByteRanges(np.array([4]), np.array([0]), np.array([BS * HD * 4]))
    with pytest.raises(ValueError, match="head tiles"):
        t.write_ranges(decode[0][0].agent_name, bad)
