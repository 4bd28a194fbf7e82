"""Parallel groups (TP/PP/EP) of one worker group.

The layers read their rank and size from here so that tensor parallelism is a change of group,
not of model code. ``pg`` is the torch.distributed group of this stage's tensor-parallel ranks
(None: the default group, i.e. a group without pipeline stages).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.config import ParallelConfig


@dataclass(frozen=True)
class ParallelGroup:
    """This rank's position in a tensor-parallel group and, with pipeline stages, its stage."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    pg: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} out of range for tp_size {self.tp_size}")
        if not 0 <= self.pp_rank < self.pp_size:
            raise ValueError(f"pp_rank {self.pp_rank} out of range for pp_size {self.pp_size}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum partial results of a row-parallel layer across the group."""
        if self.tp_size == 1:
            return x
        torch.distributed.all_reduce(x, group=self.pg)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate vocab shards of the LM head's logits."""
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.pg)
        return torch.cat(parts, dim=-1)

    def shard(self, n: int, what: str) -> int:
        if n % self.tp_size:
            raise ValueError(f"{what} = {n} is not divisible by tp_size {self.tp_size}")
        return n // self.tp_size

    def kv_replicas(self, num_kv_heads: int) -> int:
        """How many ranks share one KV head: 1 when tp divides the heads, tp / heads when tp exceeds them."""
        if self.tp_size <= num_kv_heads:
            self.shard(num_kv_heads, "num_kv_heads")
            return 1
        if self.tp_size % num_kv_heads:
            raise ValueError(
                f"tp_size {self.tp_size} exceeds num_kv_heads = {num_kv_heads} and is not a multiple of it"
            )
        return self.tp_size // num_kv_heads

    def local_kv_heads(self, num_kv_heads: int) -> int:
        """KV heads held (and cached) on this rank."""
        return num_kv_heads * self.kv_replicas(num_kv_heads) // self.tp_size

    def stage_layers(self, num_layers: int) -> range:
        """The decoder layers of this pipeline stage: contiguous, sizes differ by at most one."""
        return stage_layers(num_layers, self.pp_rank, self.pp_size)

    @classmethod
    def from_config(cls, cfg: ParallelConfig) -> ParallelGroup:
        """This rank's group; world size 1 needs no process group."""
        if cfg.world_size == 1:
            return cls()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            field_name = "tp_size" if cfg.tp_size > 1 else "pp_size"
            raise ValueError(
                f"{field_name}: {getattr(cfg, field_name)} needs an initialised torch.distributed process group"
            )
        from engine.distributed.world import current_world

        world = current_world()
        pg = world.tp_group if world is not None else None
        return cls(tp_rank=cfg.tp_rank, tp_size=cfg.tp_size, pp_rank=cfg.pp_rank, pp_size=cfg.pp_size, pg=pg)


def stage_layers(num_layers: int, pp_rank: int, pp_size: int) -> range:
    """Layers of stage ``pp_rank`` of ``pp_size``; earlier stages take the remainder."""
    if pp_size > num_layers:
        raise ValueError(f"pp_size = {pp_size} exceeds the model's {num_layers} layers")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (pp_rank < extra))


SINGLE = ParallelGroup()
