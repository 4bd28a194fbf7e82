"""One rank's end of KV transfer between worker groups: its own transport, its own writes.

Every rank of a group (rank 0 and followers alike) registers its own pool with a transport of
its own and writes, per layer it computed, the slices it owes each rank of the other group
(`kvtransfer.group_slices`) straight into that rank's pool. Followers get their orders from
rank 0 through the group's step plan (`StepPlan.kv`) and answer through `gather_replies`:

* `OpenRankTransport` (start-up): open and register the rank's transport; reply: its metadata.
* `AddGroupPeer` / `RemoveGroupPeer` (handshake, peer loss): connect to (or drop) the ranks of
  another group this rank writes to; reply: "" or why not.
* a step's pushes (`Push` list): each rank writes its slices as its layers finish, waits until
  they landed, and reports ``{peer group: error}`` (empty: all landed) to rank 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvtransfer.base import KVTransport, TransferHandle, TransportOptions
from kvtransfer.errors import TransferTimeoutError
from kvtransfer.group_bundle import GroupBundle
from kvtransfer.group_slices import GroupShape, check_pairing, pieces, slice_ranges
from kvtransfer.registry import create_transport
from protocol import kv_handshake as handshake

TIMED_OUT = "timed out:"  # a report starting so: the rank dropped its links to that group


def rank_agent(agent: str, rank: int) -> str:
    """Rank 0 is the worker (its agent name is the group's); rank r > 0 is ``<agent>.r<r>``."""
    return agent if rank == 0 else f"{agent}.r{rank}"


@dataclass(frozen=True)
class Push:
    """One sequence's blocks of one step, to one peer group (rank 0's block ids address every rank)."""

    peer: str
    local: list[int]
    remote: list[int]


class RankKV:
    """This rank's transport and the ranks of other groups it writes to."""

    def __init__(self, transport: KVTransport, shape: GroupShape, rank: int, num_blocks: int,
                 token: str, timeout_s: float, on_cuda: bool = False) -> None:
        self.transport, self.shape, self.rank, self.on_cuda = transport, shape, rank, on_cuda
        self.num_blocks, self.token, self.timeout_s = num_blocks, token, timeout_s
        # peer group -> (its shape, [(its rank, agent, its pool's block count)] this rank writes to)
        self.groups: dict[str, tuple[GroupShape, list[tuple[int, str, int]]]] = {}
        self._handles: list[tuple[str, TransferHandle]] = []
        self._errors: dict[str, str] = {}

    def add_group(self, bundle: GroupBundle) -> None:
        """Connect to the ranks of ``bundle``'s group this rank owes slices; raises
        `GroupPairingError` naming both shapes, or the transport's error."""
        check_pairing(self.shape, bundle.shape)
        self.remove_group(bundle.agent)
        targets = []
        for src, dst in pieces(self.shape, bundle.shape):
            if src == self.rank:
                info = handshake.decode(bundle.ranks[dst], self.token)
                targets.append((dst, self.transport.add_peer(bundle.ranks[dst]), info.layout.num_blocks))
        self.groups[bundle.agent] = (bundle.shape, targets)

    def remove_group(self, name: str) -> None:
        _, targets = self.groups.pop(name, (None, []))
        for _, agent, _ in targets:
            self.transport.remove_peer(agent)

    def write(self, peer: str, local: list[int], remote: list[int], layers: list[int]) -> list[TransferHandle]:
        """Issue this rank's slices of ``layers`` (global ids) of the paired blocks to ``peer``'s ranks."""
        shape, targets = self.groups[peer]
        out = []
        for dst, agent, dst_blocks in targets:
            ranges = slice_ranges(self.shape, self.rank, shape, dst, np.asarray(local), np.asarray(remote),
                                  np.asarray(layers), self.num_blocks, dst_blocks)
            if len(ranges):
                out.append(self.transport.write_ranges(agent, ranges))
        return out

    def layer_hook(self, pushes: list[Push]) -> Callable[[int], None]:
        """A follower's ``on_layer_done`` for one step: write every push's slices of that layer."""
        self._handles, self._errors = [], {}

        def hook(layer: int) -> None:
            if self.on_cuda:  # the hook runs when the layer's kernels are queued: wait until they ran
                torch.cuda.current_stream().synchronize()
            for p in pushes:
                if p.peer in self._errors or p.peer not in self.groups:
                    continue
                try:
                    self._handles += [(p.peer, h) for h in self.write(p.peer, p.local, p.remote, [layer])]
                except Exception as e:  # peer gone, bad range: that peer's sequences fail
                    self._errors[p.peer] = f"rank {self.rank}: {e}"

        return hook

    def finish(self, pushes: list[Push]) -> dict[str, str]:
        """Wait until every write of the step landed (or failed): rank 0 notifies only then."""
        deadline = time.monotonic() + self.timeout_s
        for peer, h in self._handles:
            try:
                self.transport.wait(h, max(0.0, deadline - time.monotonic()))
            except TransferTimeoutError as e:  # may still be in flight: only dropping the link stops it
                self.transport.remove_peer(h.peer)
                self._errors[peer] = f"{TIMED_OUT} rank {self.rank}: {e}"
            except Exception as e:
                self._errors.setdefault(peer, f"rank {self.rank}: {e}")
        errors, self._handles, self._errors = self._errors, [], {}
        return errors


# ---- commands rank 0 sends its followers (pickled inside the step plan) ------------------------


@dataclass(frozen=True)
class OpenRankTransport:
    backend: str
    options: TransportOptions
    agent: str  # the group's (rank 0's) agent name
    compat: dict[str, Any]
    shape: GroupShape
    timeout_s: float

    def open(self, pool: Any, rank: int) -> RankKV:
        transport = create_transport(self.backend, rank_agent(self.agent, rank), self.options)
        try:
            transport.register_pool(pool, self.compat, group=True)
        except BaseException:
            transport.close()
            raise
        return RankKV(transport, self.shape, rank, pool.num_blocks, self.options.token, self.timeout_s,
                      on_cuda=pool.kv.is_cuda)

    def apply(self, runner: Any) -> tuple[str, bytes]:
        try:
            runner.kv = self.open(runner.pool, runner.world.rank)
        except Exception as e:
            return f"rank {runner.world.rank}: {e}", b""
        return "", runner.kv.transport.metadata()


@dataclass(frozen=True)
class AddGroupPeer:
    metadata: bytes

    def apply(self, runner: Any) -> str:
        try:
            runner.kv.add_group(GroupBundle.decode(self.metadata, runner.kv.token))
        except Exception as e:
            return f"rank {runner.world.rank}: {e}"
        return ""


@dataclass(frozen=True)
class RemoveGroupPeer:
    name: str

    def apply(self, runner: Any) -> str:
        runner.kv.remove_group(self.name)
        return ""


@dataclass(frozen=True)
class CloseRankTransport:
    def apply(self, runner: Any) -> str:
        if runner.kv is not None:
            runner.kv.transport.close()
            runner.kv = None
        return ""
