"""Block-run coalescing and byte ranges: exact descriptors for known block lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.kv_cache_pool import KVLayout
from kvtransfer.descriptors import (
    ByteRanges,
    as_block_array,
    as_layer_array,
    block_indices,
    byte_ranges,
    coalesce_blocks,
    merge_adjacent,
    sort_pairs,
)

LOCAL = KVLayout(num_layers=3, num_blocks=10, num_kv_heads=2, block_size=4, head_dim=8, dtype=torch.float16)
REMOTE = KVLayout(num_layers=3, num_blocks=20, num_kv_heads=2, block_size=4, head_dim=8, dtype=torch.float16)
BB = LOCAL.block_bytes_per_layer  # 256


def runs_of(local: list[int], remote: list[int]) -> list[tuple[int, int, int]]:
    r = coalesce_blocks(local, remote)
    return list(zip(r.local.tolist(), r.remote.tolist(), r.count.tolist()))


def test_coalesce_runs_need_both_sides_consecutive() -> None:
    assert runs_of([1, 2, 3, 7, 8, 9], [4, 5, 6, 10, 11, 12]) == [(1, 4, 3), (7, 10, 3)]
    assert runs_of([1, 2, 3], [4, 5, 9]) == [(1, 4, 2), (3, 9, 1)]  # remote breaks the run
    assert runs_of([5, 4, 3], [0, 1, 2]) == [(5, 0, 1), (4, 1, 1), (3, 2, 1)]  # descending local
    assert runs_of([0, 1, 2, 3], [0, 1, 2, 3]) == [(0, 0, 4)]
    assert runs_of([7], [3]) == [(7, 3, 1)]
    assert runs_of([], []) == []


def test_coalesce_rejects_unpaired_lists() -> None:
    with pytest.raises(ValueError, match="2 local blocks paired with 1 remote"):
        coalesce_blocks([1, 2], [3])


def test_block_validation() -> None:
    assert as_block_array([3, 1], 10, "local", unique=True).tolist() == [3, 1]
    assert as_block_array(np.array([2, 2]), 10, "local", unique=False).tolist() == [2, 2]
    with pytest.raises(ValueError, match=r"remote block ids \[10\] are outside the pool's 10 blocks"):
        as_block_array([9, 10], 10, "remote", unique=True)
    with pytest.raises(ValueError, match="outside"):
        as_block_array([-1], 10, "remote", unique=True)
    with pytest.raises(ValueError, match="repeat"):
        as_block_array([4, 4], 10, "remote", unique=True)
    with pytest.raises(ValueError, match="1-D sequence of ints"):
        as_block_array([1.5], 10, "local", unique=False)
    assert as_layer_array(None, 3).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="layer"):
        as_layer_array([3], 3)


def test_byte_ranges_one_descriptor_per_run_per_layer() -> None:
    runs = coalesce_blocks([1, 2, 6], [11, 12, 0])
    r = byte_ranges(runs, np.array([0, 2]), LOCAL, REMOTE)
    lstride, rstride = LOCAL.layer_stride_bytes, REMOTE.layer_stride_bytes
    assert r.local.tolist() == [1 * BB, 6 * BB, 2 * lstride + 1 * BB, 2 * lstride + 6 * BB]
    assert r.remote.tolist() == [11 * BB, 0, 2 * rstride + 11 * BB, 2 * rstride]
    assert r.nbytes.tolist() == [2 * BB, BB, 2 * BB, BB]
    assert r.total_bytes == 6 * BB and len(r) == 4


def test_byte_ranges_merge_across_layers_when_pools_line_up() -> None:
    # whole pool to an equal-sized pool: every layer's run continues into the next layer
    runs = coalesce_blocks(range(10), range(10))
    r = byte_ranges(runs, np.arange(3), LOCAL, LOCAL)
    assert (r.local.tolist(), r.remote.tolist(), r.nbytes.tolist()) == ([0], [0], [LOCAL.total_bytes])
    # but not into a pool with a different layer stride
    assert len(byte_ranges(runs, np.arange(3), LOCAL, REMOTE)) == 3


def test_merge_adjacent_only_when_both_sides_continue() -> None:
    r = ByteRanges(np.array([0, 100, 300]), np.array([50, 150, 250]), np.array([100, 100, 10]))
    m = merge_adjacent(r)
    assert (m.local.tolist(), m.remote.tolist(), m.nbytes.tolist()) == ([0, 300], [50, 250], [200, 10])


def test_byte_ranges_refuses_different_block_bytes() -> None:
    other = KVLayout(3, 10, 4, 4, 8, torch.float16)
    with pytest.raises(ValueError, match="block bytes differ"):
        byte_ranges(coalesce_blocks([0], [0]), np.arange(1), LOCAL, other)


def test_block_indices_layer_major() -> None:
    idx = block_indices(np.array([3, 1]), np.array([0, 2]), num_blocks=10)
    assert idx.tolist() == [3, 1, 23, 21] and idx.dtype == np.int32


def test_sorted_pairs_turn_descending_runs_into_one_descriptor() -> None:
    # what two pools hand out after a sequence was freed tail first on both sides
    local, remote = np.array([7, 6, 5, 4, 9]), np.array([15, 14, 13, 12, 3])
    assert len(runs_of(local.tolist(), remote.tolist())) == 5
    lo, ro = sort_pairs(local, remote)
    assert dict(zip(lo.tolist(), ro.tolist())) == dict(zip(local.tolist(), remote.tolist()))
    assert runs_of(lo.tolist(), ro.tolist()) == [(4, 12, 4), (9, 3, 1)]
