"""Who writes what to whom between two worker groups of different tp/pp splits.

Each rank of a group holds the KV of a contiguous run of layers (its pipeline stage) and a
contiguous run of KV heads (its tensor rank; one head, replicated, when tp exceeds the KV heads).
A prefill rank writes to a decode rank exactly the intersection of their (layers, heads), per
block and per layer, straight from its pool into the other's: nothing is gathered on one rank.
Of the prefill ranks that hold a replicated head only the first (the *primary*) writes it.

Within a block of one layer the pool stores ``[K|V, head, slot, head_dim]``, so one K (or V)
head run is one contiguous byte range on each side: a piece is two descriptors per (layer,
block) (K and V), merged where they touch (whole blocks, consecutive blocks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from engine.errors import SplitserveError
from engine.parallel import stage_layers
from kvtransfer.descriptors import ByteRanges, merge_adjacent


class GroupPairingError(SplitserveError, ValueError):
    """Two worker groups cannot exchange KV (other model or KV geometry, or a split that does not fit)."""


@dataclass(frozen=True)
class RankSlice:
    """The KV one rank holds: global layer ids and global KV head ids; ``primary``: it writes its heads."""

    layers: range
    heads: range
    primary: bool


@dataclass(frozen=True)
class GroupShape:
    """A group's split and the KV geometry it splits: the group part of the handshake's compat key."""

    tp: int
    pp: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def describe(self) -> str:
        return (f"tp={self.tp} pp={self.pp} ({self.num_layers} layers, {self.num_kv_heads} KV heads, "
                f"head_dim {self.head_dim}, block_size {self.block_size}, {self.dtype})")

    def check(self) -> None:
        """Raise `GroupPairingError` unless tp and pp split this geometry."""
        kv, tp = self.num_kv_heads, self.tp
        if tp < 1 or self.pp < 1 or (tp <= kv and kv % tp) or (tp > kv and tp % kv):
            raise GroupPairingError(f"{self.describe()}: tp must divide the KV heads or be a multiple of them")
        if self.pp > self.num_layers:
            raise GroupPairingError(f"{self.describe()}: more pipeline stages than layers")

    def rank_slice(self, rank: int) -> RankSlice:
        """Global rank ``rank`` is tensor rank ``rank % tp`` of stage ``rank // tp`` (`ParallelConfig`)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a group of {self.world_size}")
        t, stage = rank % self.tp, rank // self.tp
        layers = stage_layers(self.num_layers, stage, self.pp)
        kv = self.num_kv_heads
        if self.tp <= kv:
            n = kv // self.tp
            return RankSlice(layers, range(t * n, (t + 1) * n), True)
        replicas = self.tp // kv
        return RankSlice(layers, range(t // replicas, t // replicas + 1), t % replicas == 0)

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, m: Any) -> GroupShape:
        try:
            shape = cls(**{k: (str(m[k]) if k == "dtype" else int(m[k])) for k in cls.__dataclass_fields__})
        except (KeyError, TypeError, ValueError) as e:
            raise GroupPairingError(f"malformed group shape {m!r}: {e}") from None
        return shape


def check_pairing(prefill: GroupShape, decode: GroupShape) -> None:
    """Refuse, naming both shapes, a pairing whose blocks cannot be split and reassembled."""
    diffs = [f for f in ("num_layers", "num_kv_heads", "head_dim", "block_size", "dtype")
             if getattr(prefill, f) != getattr(decode, f)]
    if diffs:
        raise GroupPairingError(
            f"prefill group {prefill.describe()} cannot write to decode group {decode.describe()}: "
            f"{', '.join(diffs)} differ"
        )
    for side, shape in (("prefill", prefill), ("decode", decode)):
        try:
            shape.check()
        except GroupPairingError as e:
            raise GroupPairingError(
                f"prefill group {prefill.describe()} cannot pair with decode group {decode.describe()}: "
                f"the {side} split does not fit: {e}"
            ) from None


def _overlap(a: range, b: range) -> range:
    return range(max(a.start, b.start), min(a.stop, b.stop))


def pieces(prefill: GroupShape, decode: GroupShape) -> list[tuple[int, int]]:
    """Every (prefill rank, decode rank) that exchanges a non-empty slice: the writes to expect."""
    out = []
    for s in range(prefill.world_size):
        src = prefill.rank_slice(s)
        for d in range(decode.world_size):
            dst = decode.rank_slice(d)
            if src.primary and len(_overlap(src.layers, dst.layers)) and len(_overlap(src.heads, dst.heads)):
                out.append((s, d))
    return out


def piece_layers(prefill: GroupShape, src_rank: int, decode: GroupShape, dst_rank: int) -> range:
    """The global layers prefill rank ``src_rank`` writes to decode rank ``dst_rank`` (empty: none)."""
    src, dst = prefill.rank_slice(src_rank), decode.rank_slice(dst_rank)
    if not src.primary or not len(_overlap(src.heads, dst.heads)):
        return range(0)
    return _overlap(src.layers, dst.layers)


def slice_ranges(
    prefill: GroupShape, src_rank: int, decode: GroupShape, dst_rank: int,
    local_blocks: np.ndarray, remote_blocks: np.ndarray, layers: np.ndarray,
    local_num_blocks: int, remote_num_blocks: int,
) -> ByteRanges:
    """Byte ranges (from each pool's base) of ``layers`` (global ids) of the paired blocks that
    ``src_rank`` owes ``dst_rank``; layers outside the piece are skipped."""
    src, dst = prefill.rank_slice(src_rank), decode.rank_slice(dst_rank)
    heads = _overlap(src.heads, dst.heads)
    wanted = _overlap(src.layers, dst.layers)
    layers = np.asarray([x for x in np.asarray(layers).tolist() if x in wanted], dtype=np.int64)
    empty = np.zeros(0, dtype=np.int64)
    if not src.primary or not len(heads) or layers.size == 0 or len(local_blocks) == 0:
        return ByteRanges(empty, empty, empty)
    tile = prefill.block_size * prefill.head_dim * _element_size(prefill.dtype)
    n_src, n_dst = len(src.heads), len(dst.heads)
    lb = np.asarray(local_blocks, dtype=np.int64)
    rb = np.asarray(remote_blocks, dtype=np.int64)
    order = np.argsort(lb, kind="stable")
    lb, rb = lb[order], rb[order]
    kv = np.arange(2, dtype=np.int64)
    # [layer, block, kv] grid, layer-major, so neighbours in memory are neighbours in the list
    ll = (layers - src.layers.start).reshape(-1, 1, 1)
    rl = (layers - dst.layers.start).reshape(-1, 1, 1)
    lo = (ll * local_num_blocks + lb.reshape(1, -1, 1)) * 2 * n_src * tile + kv.reshape(1, 1, -1) * n_src * tile
    ro = (rl * remote_num_blocks + rb.reshape(1, -1, 1)) * 2 * n_dst * tile + kv.reshape(1, 1, -1) * n_dst * tile
    lo = lo + (heads.start - src.heads.start) * tile
    ro = ro + (heads.start - dst.heads.start) * tile
    n = np.full(lo.size, len(heads) * tile, dtype=np.int64)
    return merge_adjacent(ByteRanges(lo.reshape(-1), ro.reshape(-1), n))


def _element_size(dtype: str) -> int:
    import torch

    value = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise GroupPairingError(f"unknown KV dtype {dtype!r}")
    return torch.empty((), dtype=value).element_size()
