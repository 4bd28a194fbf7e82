"""The process group of one worker group: ``tp x pp`` ranks, one torch.distributed world.

NCCL on GPU, gloo on CPU. The step plan travels on its own gloo group with a long timeout:
followers wait on it for as long as rank 0 is idle, while a collective inside a step that waits
that long means a dead rank and should fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from engine.errors import SplitserveError

STEP_TIMEOUT = timedelta(minutes=10)
IDLE_TIMEOUT = timedelta(days=30)


class GroupSetupError(SplitserveError, RuntimeError):
    """The ranks of a group could not form their process group."""


class GroupRankError(SplitserveError, RuntimeError):
    """A rank of a running group is gone (its process died): the group cannot step any more."""


@dataclass(frozen=True)
class World:
    """This process's place in its group, and the process groups it talks on."""

    rank: int
    tp_size: int
    pp_size: int
    device: str
    tp_group: Any  # this stage's tensor-parallel ranks (None: the default group)
    control: Any  # rank 0 -> all: step plans (gloo)

    @property
    def size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    def peer(self, pp_rank: int, tp_rank: int | None = None) -> int:
        """Global rank of ``tp_rank`` (default: ours) in stage ``pp_rank``."""
        return pp_rank * self.tp_size + (self.tp_rank if tp_rank is None else tp_rank)


_current: World | None = None


def init_world(address: str, rank: int, tp_size: int, pp_size: int, device: str) -> World:
    """Join the group rendezvousing at ``address`` (``host:port``, rank 0 listens); blocks until all ranks join."""
    global _current
    if _current is not None or dist.is_initialized():
        raise GroupSetupError("this process already belongs to a worker group; close it first")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    world = tp_size * pp_size
    try:
        dist.init_process_group(
            backend, init_method=f"tcp://{address}", rank=rank, world_size=world, timeout=STEP_TIMEOUT
        )
    except (RuntimeError, ValueError) as e:
        raise GroupSetupError(f"rank {rank} of {world} could not join the group at {address}: {e}") from e
    tp_group = None
    if pp_size > 1 and tp_size > 1:  # every rank creates every stage's group, in the same order
        groups = [dist.new_group(list(range(s * tp_size, (s + 1) * tp_size))) for s in range(pp_size)]
        tp_group = groups[rank // tp_size]
    control = dist.new_group(list(range(world)), backend="gloo", timeout=IDLE_TIMEOUT)
    _current = World(rank, tp_size, pp_size, device, tp_group, control)
    return _current


def current_world() -> World | None:
    return _current


def close_world() -> None:
    """Leave the group (idempotent)."""
    global _current
    _current = None
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: str, rank: int) -> str:
    """The device of ``rank`` in one process tree: ``cuda`` becomes ``cuda:<rank mod GPUs>``."""
    if device != "cuda" or not torch.cuda.is_available():
        return device
    return f"cuda:{rank % torch.cuda.device_count()}"
