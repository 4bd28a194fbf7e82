"""`GroupTransport`: rank 0's face of its whole group's KV transports, to the worker's loops.

The prefill and decode loops drive one transport; with ``kv_groups`` that transport is this
facade, so they stay as they are:

* ``metadata()`` is the group's bundle (shape + every rank's metadata), what decode hands prefill.
* ``add_peer(bundle)`` checks the pairing (refusing with both shapes named), connects rank 0 to
  the peer ranks it owes, and has every follower do the same (`AddGroupPeer`).
* ``begin_step`` (the prefill connector, before the forward) queues the step's pushes; the group
  runner sends them with the step plan (`orders`), every follower writes its slices during the
  forward and reports after it (`collect`). ``write_blocks`` writes rank 0's own slices.
* A handle is done once rank 0's writes landed and no follower reported an error for its peer;
  only then is its notification sent. Decode's rank 0 thus learns of a prompt only after every
  (prefill rank, decode rank) piece landed: followers report after waiting for their writes.

Block ids are global within a group (one block manager on rank 0), so freeing a block on abort
or lease expiry frees it on every rank of both groups.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import count
from pathlib import Path
from typing import Any

from engine.config import parse_dtype
from kvtransfer.base import Op, TransferHandle, TransportOptions
from kvtransfer.errors import KVTransferError, TransferFailedError, TransferTimeoutError
from kvtransfer.group_bundle import GroupBundle
from kvtransfer.group_slices import GroupShape
from protocol.worker_spec import WorkerSpec
from worker_runtime.rank_kv import (
    TIMED_OUT,
    AddGroupPeer,
    CloseRankTransport,
    OpenRankTransport,
    Push,
    RankKV,
    RemoveGroupPeer,
)


class GroupTransport:
    def __init__(self, own: RankKV, runner: Any, rank_metadata: list[bytes]) -> None:
        self.own = own
        self.inner = own.transport
        self.agent_name = self.inner.agent_name
        self._runner = runner if own.shape.world_size > 1 else None
        self._bundle = GroupBundle(self.agent_name, own.shape, rank_metadata)
        self._orders: list[Push] = []
        self._errors: dict[str, str] = {}
        self._ids = count(1)

    # ---- handshake --------------------------------------------------------------------------

    def metadata(self) -> bytes:
        return self._bundle.encode(self.own.token)

    def add_peer(self, metadata: bytes) -> str:
        bundle = GroupBundle.decode(metadata, self.own.token)
        self.own.add_group(bundle)  # GroupPairingError names both shapes
        if self._runner is not None:
            refused = [r for r in self._runner.kv_command(AddGroupPeer(metadata)) if r]
            if refused:
                self.remove_peer(bundle.agent)
                raise KVTransferError(f"group {bundle.agent!r}: {refused[0]}")
        return bundle.agent

    def remove_peer(self, peer: str) -> None:
        self.own.remove_group(peer)
        if self._runner is not None:
            self._runner.kv_command(RemoveGroupPeer(peer))

    @property
    def peers(self) -> list[str]:
        return sorted(self.own.groups)

    @property
    def compat(self) -> dict[str, Any]:
        """Every rank's transport key (the same on each), plus this group's split."""
        return {**self.inner.compat, **{f"group.{k}": v for k, v in self.own.shape.to_wire().items()}}

    # ---- the step's pushes ------------------------------------------------------------------

    def begin_step(self, pushes: list[Push]) -> None:
        self._orders, self._errors = pushes, {}

    def orders(self) -> list[Push] | None:
        """The group runner's hook: this step's pushes for the followers (None: nothing to send)."""
        orders, self._orders = self._orders, []
        return orders or None

    def collect(self, reports: list[Any]) -> None:
        for report in reports:
            for peer, error in (report or {}).items():
                self._errors.setdefault(peer, error)

    def write_blocks(self, peer: str, local_blocks: Sequence[int], remote_blocks: Sequence[int],
                     layers: Sequence[int] | None = None, notify: bytes | None = None) -> TransferHandle:
        layer_ids = list(layers) if layers is not None else list(self.own.shape.rank_slice(0).layers)
        handles = self.own.write(peer, list(local_blocks), list(remote_blocks), layer_ids)
        nbytes = sum(h.nbytes for h in handles)
        handle = TransferHandle(next(self._ids), peer, Op.WRITE, nbytes, sum(h.num_descriptors for h in handles))
        handle.state = (handles, notify)
        return handle

    def is_done(self, handle: TransferHandle) -> bool:
        handles, notify = handle.state
        if handle.error is not None:
            raise handle.error
        if not all(self.inner.is_done(h) for h in handles):
            return False
        if handle.peer in self._errors:
            why = self._errors[handle.peer]
            # a follower's timed-out write: the connector drops the whole peer group (`remove_peer`)
            kind = TransferTimeoutError if why.startswith(TIMED_OUT) else TransferFailedError
            handle.error = kind(f"KV write to group {handle.peer!r}: {why}")
            raise handle.error
        if notify is not None:  # every piece of the group landed: now decode may learn of it
            handle.state = (handles, None)
            self.inner.notify(handle.peer, notify)
        handle.finished = True
        return True

    def wait(self, handle: TransferHandle, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_done(handle):
            if time.monotonic() > deadline:
                raise TransferTimeoutError(f"write to group {handle.peer!r} not done after {timeout:.3g}s")
            time.sleep(0.0005)

    def notify(self, peer: str, msg: bytes) -> None:
        self.inner.notify(peer, msg)

    def poll_notifications(self) -> list[tuple[str, bytes]]:
        return self.inner.poll_notifications()

    def close(self) -> None:
        self.inner.close()


def group_shape(spec: WorkerSpec, engine: Any) -> GroupShape:
    m, lay = engine.model_config, engine.layout
    return GroupShape(spec.tp_size, spec.pp_size, m.num_layers, m.num_kv_heads, lay.head_dim, lay.block_size,
                      str(lay.dtype))


def group_compat(spec: WorkerSpec, shape: GroupShape) -> dict[str, Any]:
    """The same on every rank of every split of the model: weights and the whole KV geometry."""
    model = Path(spec.model).name + (f"+random-seed{spec.seed}" if spec.random_weights else "")
    return {"model": model, "model_dtype": str(parse_dtype(spec.dtype)), "kv.model_layers": shape.num_layers,
            "kv.model_kv_heads": shape.num_kv_heads, "kv.head_dim": shape.head_dim,
            "kv.block_size": shape.block_size, "kv.dtype": shape.dtype}


def open_group_transport(spec: WorkerSpec, agent_name: str, token: str, engine: Any) -> GroupTransport:
    """Rank 0: open its own transport and every follower's (one `OpenRankTransport` round)."""
    shape = group_shape(spec, engine)
    options = TransportOptions(**{"host": spec.host, **spec.transport_options, "token": token})
    cmd = OpenRankTransport(spec.transport, options, agent_name, group_compat(spec, shape), shape,
                            spec.transfer_timeout_s)
    own = cmd.open(engine.pool, 0)
    runner = engine.runner
    mds = [own.transport.metadata()]
    if shape.world_size > 1:
        replies = runner.kv_command(cmd)[1:]
        failed = [why for why, _ in replies if why]
        if failed:
            runner.kv_command(CloseRankTransport())
            own.transport.close()
            raise KVTransferError(f"the group's transports did not open: {failed[0]}")
        mds += [md for _, md in replies]
    transport = GroupTransport(own, runner, mds)
    if shape.world_size > 1:
        runner.kv = transport
    return transport
