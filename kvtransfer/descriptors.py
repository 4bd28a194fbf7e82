"""Block lists → transfer descriptors: validation, coalescing, byte offsets.

Pure functions over numpy arrays (no transport state), so every backend shares them and the
tests can pin exact descriptors. A *run* is a stretch where both the local and the remote block
ids go up by one; in a ``[layer, block, ...]`` pool a run of one layer is one contiguous byte
range on each side, hence one descriptor. Few large descriptors are what make RDMA/NVLink
transfers reach line rate; per-block descriptors leave most of it on the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from engine.kv_cache_pool import KVLayout

BlockIds = Sequence[int] | np.ndarray


class BlockRuns(NamedTuple):
    """Runs of consecutive block ids, ``count[i]`` blocks from ``local[i]`` ↔ ``remote[i]``."""

    local: np.ndarray  # int64 [R]
    remote: np.ndarray  # int64 [R]
    count: np.ndarray  # int64 [R]


class ByteRanges(NamedTuple):
    """Byte ranges relative to each pool's base: ``nbytes[i]`` bytes ``local[i]`` ↔ ``remote[i]``."""

    local: np.ndarray  # int64 [N]
    remote: np.ndarray  # int64 [N]
    nbytes: np.ndarray  # int64 [N]

    @property
    def total_bytes(self) -> int:
        return int(self.nbytes.sum())

    def __len__(self) -> int:  # number of descriptors
        return int(self.nbytes.shape[0])


def as_block_array(blocks: BlockIds, num_blocks: int, side: str, unique: bool) -> np.ndarray:
    """Validate block ids against a pool of ``num_blocks`` blocks (raises `ValueError` naming ``side``).

    ``unique`` is set for the side that is written to: two sources landing in one block is a
    caller bug that would otherwise surface as a corrupted sequence much later.
    """
    arr = np.asarray(blocks)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{side} block ids must be a 1-D sequence of ints, got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= num_blocks):
        bad = arr[(arr < 0) | (arr >= num_blocks)][:4].tolist()
        raise ValueError(f"{side} block ids {bad} are outside the pool's {num_blocks} blocks")
    if unique and np.unique(arr).size != arr.size:
        raise ValueError(f"{side} block ids repeat a block: {arr.tolist()[:16]}")
    return arr


def as_layer_array(layers: Sequence[int] | None, num_layers: int) -> np.ndarray:
    """``None`` means every layer; otherwise distinct layer ids within ``[0, num_layers)``."""
    if layers is None:
        return np.arange(num_layers, dtype=np.int64)
    arr = as_block_array(layers, num_layers, "layer", unique=True)
    return arr


def sort_pairs(local: np.ndarray, remote: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order the pairing by local block id (the pairs themselves are kept).

    A pool frees a sequence tail first, so blocks come back to both sides' free lists in
    descending runs; two such runs pair up block for block but never look "consecutive" in
    the given order. Sorted, they are ascending runs on both sides and coalesce: on the GPU
    that is one copy per run per layer instead of one per block (256 per layer for 4K tokens).
    """
    if local.shape != remote.shape:
        raise ValueError(f"{local.size} local blocks paired with {remote.size} remote blocks")
    order = np.argsort(local, kind="stable")
    return local[order], remote[order]


def coalesce_blocks(local_blocks: BlockIds, remote_blocks: BlockIds) -> BlockRuns:
    """Split the pairing ``local_blocks[i] ↔ remote_blocks[i]`` into maximal runs, order kept."""
    local = np.asarray(local_blocks, dtype=np.int64).reshape(-1)
    remote = np.asarray(remote_blocks, dtype=np.int64).reshape(-1)
    if local.shape != remote.shape:
        raise ValueError(f"{local.size} local blocks paired with {remote.size} remote blocks")
    if local.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return BlockRuns(empty, empty, empty)
    breaks = (np.diff(local) != 1) | (np.diff(remote) != 1)
    starts = np.concatenate(([0], np.flatnonzero(breaks) + 1))
    counts = np.diff(np.concatenate((starts, [local.size])))
    return BlockRuns(local[starts], remote[starts], counts)


def merge_adjacent(ranges: ByteRanges) -> ByteRanges:
    """Merge range ``i+1`` into ``i`` where both sides continue exactly where ``i`` ended.

    Catches what block runs alone cannot: a run that ends a layer's last block and continues
    at the next layer's first block (all-layer pushes of whole pools, equal-size pools).
    """
    if len(ranges) <= 1:
        return ranges
    lo, ro, n = ranges
    cont = (lo[1:] == lo[:-1] + n[:-1]) & (ro[1:] == ro[:-1] + n[:-1])
    starts = np.concatenate(([0], np.flatnonzero(~cont) + 1))
    return ByteRanges(lo[starts], ro[starts], np.add.reduceat(n, starts))


def byte_ranges(runs: BlockRuns, layers: np.ndarray, local: KVLayout, remote: KVLayout) -> ByteRanges:
    """One descriptor per run per layer (layer-major), then adjacent ones merged.

    The two layouts may differ in ``num_blocks`` (so in layer stride); they must agree on the
    block size in bytes, which the handshake's compat key guarantees.
    """
    bb = local.block_bytes_per_layer
    if remote.block_bytes_per_layer != bb:
        raise ValueError(f"block bytes differ: local {bb}, remote {remote.block_bytes_per_layer}")
    layer_col = layers.reshape(-1, 1)
    lo = layer_col * local.layer_stride_bytes + runs.local.reshape(1, -1) * bb
    ro = layer_col * remote.layer_stride_bytes + runs.remote.reshape(1, -1) * bb
    n = np.broadcast_to(runs.count.reshape(1, -1) * bb, lo.shape)
    return merge_adjacent(ByteRanges(lo.reshape(-1), ro.reshape(-1), np.ascontiguousarray(n).reshape(-1)))


def head_tile_bytes(layout: KVLayout) -> int:
    """The finest unit a peer may address: one K or V head of one block (``[block_size, head_dim]``)."""
    return layout.block_bytes_per_layer // (2 * layout.num_kv_heads)


def check_ranges(ranges: ByteRanges, layout: KVLayout, side: str) -> None:
    """Raise `ValueError` naming ``side`` unless every range lies in the pool on head-tile boundaries."""
    offsets, nbytes = (ranges.local, ranges.nbytes) if side == "local" else (ranges.remote, ranges.nbytes)
    tile = head_tile_bytes(layout)
    ok = (
        (offsets >= 0).all() and (nbytes > 0).all() and (offsets + nbytes <= layout.total_bytes).all()
        and not (offsets % tile).any() and not (nbytes % tile).any()
    )
    if not ok:
        raise ValueError(f"{side} byte ranges fall outside the pool or off its {tile}-byte head tiles")


def block_indices(blocks: np.ndarray, layers: np.ndarray, num_blocks: int) -> np.ndarray:
    """Indices into a per-(layer, block) descriptor list ``[layer * num_blocks + block]``, layer-major.

    For backends that prepare one descriptor per block once (NIXL) and pick them per request;
    the backend merges consecutive picks into the same ranges as `byte_ranges`.
    """
    return (layers.reshape(-1, 1) * num_blocks + blocks.reshape(1, -1)).reshape(-1).astype(np.int32)
