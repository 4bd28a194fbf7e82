"""Parallel groups (TP/PP/EP) of one worker group.

World size 1 is the default and the only size wired today; the layers read their rank and
size from here so that tensor parallelism is a change of group, not of model code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ParallelConfig


@dataclass(frozen=True)
class ParallelGroup:
    """This rank's position in a tensor-parallel group."""

    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} out of range for tp_size {self.tp_size}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum partial results of a row-parallel layer across the group."""
        if self.tp_size == 1:
            return x
        torch.distributed.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate vocab shards of the LM head's logits."""
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        torch.distributed.all_gather(parts, x)
        return torch.cat(parts, dim=-1)

    def shard(self, n: int, what: str) -> int:
        if n % self.tp_size:
            raise ValueError(f"{what} = {n} is not divisible by tp_size {self.tp_size}")
        return n // self.tp_size


    @classmethod
    def from_config(cls, cfg: ParallelConfig) -> ParallelGroup:
        """This rank's tensor-parallel group; world size 1 needs no process group."""
        if cfg.tp_size > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError(f"tp_size: {cfg.tp_size} needs an initialised torch.distributed process group")
        return cls(tp_rank=cfg.tp_rank, tp_size=cfg.tp_size)


SINGLE = ParallelGroup()
