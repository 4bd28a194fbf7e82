"""`KVTransport`: how KV blocks move between the pools of two workers.

Every backend (NIXL, TCP, ...) implements the same one-sided model:

* Each worker registers its `KVCachePool` once (`register_pool`); transports never allocate
  or register memory per request.
* Workers exchange `metadata()` bytes through their handshake and `add_peer` them. The
  handshake compares compatibility keys (model, dtype, KV layout, block size, head split) and
  refuses a mismatch with `IncompatiblePeerError`.
* The initiator moves blocks: `write_blocks` pushes local blocks into the peer's pool,
  `read_blocks` pulls the peer's blocks into ours. The peer's CPU is not involved in the
  contract: it only learns about transfers through notifications.

Who pins which block until when (the contract every caller relies on):

* **Push (prefill → decode).** The decode worker allocates the destination blocks and keeps
  them pinned, unread, until it receives the prefill worker's notification (or gives up on
  the request after its own timeout and frees them). The prefill worker keeps its source
  blocks pinned and unmodified until `is_done(handle)` is true / `wait(handle)` returns:
  "done" means the bytes have landed in the peer's pool, not merely left ours.
* **Pull (decode ← prefill).** The reader keeps its destination blocks pinned until done; the
  owner keeps its source blocks pinned until it receives the reader's notification (attach
  it with ``read_blocks(..., notify=...)``: it is delivered once the owner's blocks are no
  longer needed by that read).
* **Notifications.** A notification attached to a transfer is delivered only after that
  transfer's data has landed. It says nothing about *other* transfers (backends such as NIXL
  may complete them out of order): after layer-by-layer pushes, wait for every layer's handle
  and then `notify`, or attach the notification to a transfer issued after the others are done.
* **Progress.** The initiator drives its transfers: poll `is_done` (e.g. once per engine
  step) or `wait`. Backends may only complete a transfer and send its notification from
  inside those calls (NIXL does), so a handle that nobody polls may never notify the peer.
  An idle transport costs no CPU: backend threads block (TCP: on sockets and queues; NIXL:
  its progress thread in ``poll()`` on the UCX event fds) instead of spinning.
* **Failure.** A handle that failed (`TransferFailedError`) leaves the destination bytes
  undefined. A `TransferTimeoutError` means the transfer may still be in flight: keep the
  local blocks pinned until the handle completes, fails, or the peer is removed
  (`remove_peer`/`close` tear the connection down, after which nothing touches our pool).

Thread-safety: one transport is driven from one thread (the worker's step loop); backends
may run their own threads internally.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import count
from typing import Any, ClassVar

import numpy as np

from engine.kv_cache_pool import KVCachePool
from kvtransfer import descriptors
from kvtransfer.descriptors import BlockIds, ByteRanges
from kvtransfer.errors import KVTransferError, TransferTimeoutError, UnknownPeerError
from protocol import kv_handshake as handshake
from protocol.kv_handshake import Compat, PeerInfo


@dataclass(frozen=True)
class TransportOptions:
    """Start-up options; each backend reads the fields it understands."""

    token: str = ""  # cluster token: signs metadata, authenticates TCP peers; set it in production
    host: str = "127.0.0.1"  # tcp: address to listen on
    advertise_host: str | None = None  # tcp: address peers dial (default: host, or hostname for 0.0.0.0)
    port: int = 0  # tcp: 0 picks a free port, reported in metadata()
    connect_timeout_s: float = 30.0
    nixl_backends: tuple[str, ...] = ("UCX",)
    nixl_telemetry: bool = False  # lets tests/benchmarks read NIXL's merged descriptor count
    # nixl: the longest the progress thread sleeps between UCX events. It wakes at once on a UCX
    # event (its workers' event fds); the timeout only bounds how stale progress can get.
    nixl_progress_wait_us: int = field(
        default_factory=lambda: int(os.environ.get("SPLITSERVE_NIXL_PROGRESS_WAIT_US", "100000"))
    )


class Op(StrEnum):
    WRITE = "WRITE"
    READ = "READ"


@dataclass(frozen=True)
class TransferPlan:
    """A validated transfer: block pairing, layers, and the coalesced byte ranges."""

    op: Op
    local_blocks: np.ndarray
    remote_blocks: np.ndarray
    layers: np.ndarray
    ranges: ByteRanges  # relative to each pool's base; the descriptors actually moved


@dataclass(eq=False)
class TransferHandle:
    """An outstanding transfer. Opaque to callers except for the descriptive fields."""

    id: int
    peer: str
    op: Op
    nbytes: int
    num_descriptors: int
    started: float = field(default_factory=time.perf_counter)
    finished: bool = False
    error: KVTransferError | None = None
    backend_descriptors: int | None = None  # as posted by the backend, where it reports it (NIXL telemetry)
    state: Any = field(default=None, repr=False)  # backend-private


class KVTransport(ABC):
    """One worker's end of the KV data plane (see the module docstring for the contract)."""

    name: ClassVar[str]
    # can post arbitrary head-tile byte ranges (`write_ranges`); NIXL posts prepared per-block descriptors
    supports_ranges: ClassVar[bool] = True

    def __init__(self, agent_name: str, options: TransportOptions | None = None) -> None:
        if not agent_name:
            raise ValueError("agent_name must be a non-empty, cluster-unique string")
        self.agent_name = agent_name
        self.options = options or TransportOptions()
        self._pool: KVCachePool | None = None
        self._compat: Compat = {}
        self._peers: dict[str, PeerInfo] = {}
        self._ids = count(1)
        self._closed = False

    # ------------------------------------------------------------------ set-up
    def register_pool(self, pool: KVCachePool, compat: dict[str, Any], group: bool = False) -> None:
        """Register the pool (once, for the transport's lifetime) and our compatibility key.

        ``compat`` holds what the layout cannot show: model id, TP rank/size (the head split),
        quantization... The layout's own fields are added here, unless ``group``: a rank of a
        worker group that trades head/layer slices with groups split differently keys on the
        model's whole KV geometry (in ``compat``) instead, and the group handshake checks the
        split (`group_slices.check_pairing`).
        """
        if self._pool is not None:
            raise KVTransferError("register_pool was already called: pools are registered once")
        if not pool.kv.is_contiguous():
            raise ValueError("the KV pool tensor must be contiguous to be registered")
        self._compat = handshake.group_compat(compat) if group else handshake.full_compat(pool.layout, compat)
        self._register(pool)
        self._pool = pool

    def metadata(self) -> bytes:
        """Signed msgpack bytes a peer passes to `add_peer` to reach our pool."""
        pool = self._require_pool()
        info = PeerInfo(
            self.agent_name, self.name, pool.layout, self._compat, pool.kv.device.type,
            pool.kv.device.index or 0, pool.data_ptr(), pool.layout.total_bytes, self._endpoint(),
        )
        return handshake.encode(info, self.options.token)

    def add_peer(self, metadata: bytes) -> str:
        """Verify and connect to a peer; returns its agent name (the ``peer`` of later calls).

        Raises `PeerAuthError` (token), `IncompatiblePeerError` (compat key; naming every
        differing field) or `KVTransferError` (other backend, unreachable endpoint).
        """
        self._require_pool()
        info = handshake.decode(metadata, self.options.token)
        if info.backend != self.name:
            raise KVTransferError(
                f"peer {info.agent!r} uses transport {info.backend!r}, we use {self.name!r}"
            )
        if info.agent == self.agent_name:
            raise KVTransferError(f"peer has our own agent name {info.agent!r}: names must be unique")
        handshake.check_compat(info.agent, self._compat, info.compat)
        if info.agent in self._peers:
            self.remove_peer(info.agent)  # a restarted peer: new addresses, same name
        self._connect(info)
        self._peers[info.agent] = info
        return info.agent

    def remove_peer(self, peer: str) -> None:
        """Forget a peer and tear its connection down; its outstanding handles fail."""
        if self._peers.pop(peer, None) is not None:
            self._disconnect(peer)

    @property
    def peers(self) -> list[str]:
        return sorted(self._peers)

    @property
    def compat(self) -> Compat:
        """The key registered with the pool (what peers compare)."""
        return dict(self._compat)

    # ------------------------------------------------------------------ transfers
    def write_blocks(
        self,
        peer: str,
        local_blocks: BlockIds,
        remote_blocks: BlockIds,
        layers: Sequence[int] | None = None,
        notify: bytes | None = None,
    ) -> TransferHandle:
        """Push ``local_blocks[i]`` → the peer's ``remote_blocks[i]`` for ``layers`` (None: all).

        Consecutive ids on both sides become one descriptor per run per layer. Non-blocking:
        poll `is_done` or `wait`. ``notify`` reaches the peer after this write's data.
        """
        plan = self._plan(Op.WRITE, peer, local_blocks, remote_blocks, layers)
        return self._launch(peer, plan, notify)

    def write_ranges(self, peer: str, ranges: ByteRanges, notify: bytes | None = None) -> TransferHandle:
        """Push byte ranges (offsets from each pool's base, on head-tile boundaries) to the peer:
        the head slices a rank owes a rank of a group split differently (`group_slices`)."""
        pool, info = self._require_pool(), self._peer(peer)
        if not self.supports_ranges:
            raise KVTransferError(
                f"transport {self.name!r} cannot write head slices: KV between groups of different "
                "tp/pp needs tcp, ucxx or mpi"
            )
        descriptors.check_ranges(ranges, pool.layout, "local")
        descriptors.check_ranges(ranges, info.layout, "remote")
        empty = np.zeros(0, dtype=np.int64)
        return self._launch(peer, TransferPlan(Op.WRITE, empty, empty, empty, ranges), notify)

    def read_blocks(
        self,
        peer: str,
        remote_blocks: BlockIds,
        local_blocks: BlockIds,
        layers: Sequence[int] | None = None,
        notify: bytes | None = None,
    ) -> TransferHandle:
        """Pull the peer's ``remote_blocks[i]`` → our ``local_blocks[i]``; ``notify`` tells the
        owner (after the read) that it may unpin its blocks."""
        plan = self._plan(Op.READ, peer, local_blocks, remote_blocks, layers)
        return self._launch(peer, plan, notify)

    def is_done(self, handle: TransferHandle) -> bool:
        """True once the data has landed; raises `TransferFailedError` if the transfer failed."""
        if not handle.finished:
            try:
                handle.finished = self._check(handle)
            except KVTransferError as exc:
                handle.finished, handle.error = True, exc
        if handle.error is not None:
            raise handle.error
        return handle.finished

    def wait(self, handle: TransferHandle, timeout: float) -> None:
        """Block until done; `TransferTimeoutError` after ``timeout`` seconds (still in flight)."""
        deadline = time.monotonic() + timeout
        pause = 20e-6  # back off from 20 µs to 1 ms: short pushes return fast, long ones cost no CPU
        while not self.is_done(handle):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransferTimeoutError(
                    f"{handle.op.value.lower()} of {handle.nbytes} bytes to {handle.peer!r} "
                    f"not done after {timeout:.3g}s"
                )
            self._block(handle, min(left, pause))
            pause = min(2 * pause, 1e-3)

    @abstractmethod
    def notify(self, peer: str, msg: bytes) -> None:
        """Send ``msg`` to the peer, after every transfer to it that is already done."""

    @abstractmethod
    def poll_notifications(self) -> list[tuple[str, bytes]]:
        """Notifications received since the last call, as ``(peer agent name, message)``."""

    def close(self) -> None:
        """Drop every peer, deregister the pool, stop backend threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for peer in list(self._peers):
            self.remove_peer(peer)
        self._shutdown()

    def __enter__(self) -> KVTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers
    def _require_pool(self) -> KVCachePool:
        if self._closed:
            raise KVTransferError(f"transport {self.agent_name!r} is closed")
        if self._pool is None:
            raise KVTransferError("register_pool must be called first")
        return self._pool

    def _peer(self, peer: str) -> PeerInfo:
        try:
            return self._peers[peer]
        except KeyError:
            raise UnknownPeerError(f"unknown peer {peer!r}; known peers: {self.peers}") from None

    def _plan(self, op: Op, peer: str, local: BlockIds, remote: BlockIds,
              layers: Sequence[int] | None) -> TransferPlan:
        pool, info = self._require_pool(), self._peer(peer)
        # the side written to must not name a block twice
        local_arr = descriptors.as_block_array(local, pool.num_blocks, "local", op is Op.READ)
        remote_arr = descriptors.as_block_array(remote, info.layout.num_blocks, "remote", op is Op.WRITE)
        layer_arr = descriptors.as_layer_array(layers, pool.layout.num_layers)
        local_arr, remote_arr = descriptors.sort_pairs(local_arr, remote_arr)
        runs = descriptors.coalesce_blocks(local_arr, remote_arr)
        ranges = descriptors.byte_ranges(runs, layer_arr, pool.layout, info.layout)
        return TransferPlan(op, local_arr, remote_arr, layer_arr, ranges)

    def _launch(self, peer: str, plan: TransferPlan, notify: bytes | None) -> TransferHandle:
        handle = TransferHandle(next(self._ids), peer, plan.op, plan.ranges.total_bytes, len(plan.ranges))
        if len(plan.ranges) == 0:  # nothing to move: the notification alone keeps its meaning
            if notify is not None:
                self.notify(peer, notify)
            handle.finished = True
            return handle
        self._start(handle, self._peers[peer], plan, notify)
        return handle

    def _block(self, handle: TransferHandle, seconds: float) -> None:
        """Pause inside `wait`; backends with a completion event override this to sleep on it."""
        time.sleep(seconds)

    # ------------------------------------------------------------------ backend hooks
    @abstractmethod
    def _register(self, pool: KVCachePool) -> None:
        """Make the whole pool reachable by peers (called once)."""

    @abstractmethod
    def _endpoint(self) -> dict[str, Any]:
        """Backend-specific part of `metadata()` (msgpack-able)."""

    @abstractmethod
    def _connect(self, info: PeerInfo) -> None:
        """Make the verified peer reachable (load its agent metadata, open a connection)."""

    @abstractmethod
    def _disconnect(self, peer: str) -> None:
        """Drop the peer; fail its outstanding handles."""

    @abstractmethod
    def _start(
        self, handle: TransferHandle, info: PeerInfo, plan: TransferPlan, notify: bytes | None
    ) -> None:
        """Post the transfer without waiting for it; may set ``handle.state``."""

    @abstractmethod
    def _check(self, handle: TransferHandle) -> bool:
        """Progress/poll one handle: True when done, raise `TransferFailedError` on failure."""

    @abstractmethod
    def _shutdown(self) -> None:
        """Release everything after the peers are gone."""
