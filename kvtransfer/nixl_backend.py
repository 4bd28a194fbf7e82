"""NIXL backend (primary): one-sided RDMA/NVLink/shared-memory writes through UCX.

Set-up cost is paid once, never per request:

* the whole pool tensor is registered once (DRAM on CPU, VRAM on GPU);
* one descriptor list with a descriptor per (layer, block) is prepared once for our pool and
  once per peer for its pool (``prep_xfer_dlist``): NIXL validates and resolves them then.

A request then only picks indices into those lists (``make_prepped_xfer``; ~40 µs for a
32-layer push), and NIXL merges consecutive picks into one descriptor per run per layer, the
same ranges `descriptors.byte_ranges` computes (with ``nixl_telemetry`` on, the count
NIXL posted lands in ``handle.backend_descriptors``; the tests check it).

Notifications are NIXL's own: attached to the transfer, sent by UCX after the data, keyed by
the sender's agent name. Agent metadata is opaque NIXL bytes carried inside our signed
msgpack handshake; NIXL's own pickle-based descriptor serialization is never used.

Progress: with UCX over TCP or shared memory the *target* must progress its UCX worker for
writes to land and notifications to arrive, so the peer cannot simply stop progressing while
idle. NIXL's progress thread drains the workers and then ``poll()``s on their event fds with
a timeout (``pthrDelay``); its Python wrapper hard-codes that timeout to 0, which turns the
thread into a busy loop (a whole core per idle worker). `_make_agent` keeps the thread but
gives it a real timeout (`TransportOptions.nixl_progress_wait_us`): it sleeps in ``poll()``
while nothing happens and wakes on the first UCX event, so hand-over latency is unchanged.

Exposure: UCX's TCP transport listens on every network device it finds, so a worker whose
host is loopback would still accept UCX connections on the machine's external interfaces.
For a loopback host `ucx_env.bind_ucx_to` restricts UCX to the loopback device (``UCX_NET_DEVICES=lo``;
shared memory and CUDA IPC are not network devices and stay available); an operator's own
``UCX_NET_DEVICES`` wins.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from typing import Any

import numpy as np
from nixl._api import nixl_agent, nixl_agent_config

from engine.kv_cache_pool import KVCachePool, KVLayout
from kvtransfer import descriptors
from kvtransfer.base import KVTransport, TransferHandle, TransferPlan, TransportOptions
from kvtransfer.errors import KVTransferError, TransferFailedError
from kvtransfer.ucx_env import bind_ucx_to
from protocol.kv_handshake import PeerInfo

_NIXL_INIT_AGENT = "NIXL_INIT_AGENT"
log = logging.getLogger(__name__)
_agent_lock = threading.Lock()  # the wrapper's module global is swapped while an agent is built


class _Module:
    """A module stand-in: ``overrides`` first, everything else from ``real``."""

    def __init__(self, real: Any, **overrides: Any) -> None:
        self._real = real
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _make_agent(agent_name: str, config: nixl_agent_config, progress_wait_us: int) -> nixl_agent:
    """Build the agent with the progress thread's poll timeout set (see the module docstring).

    The wrapper builds its ``nixlAgentConfig`` inline and then assigns ``pthrDelay = 0``; a
    config subclass that pins ``pthrDelay`` is the only way in without rewriting the wrapper.
    If a future wrapper no longer looks like that, the agent is built as-is (and spins).
    """
    api = sys.modules[nixl_agent.__module__]
    bind = getattr(api, "nixlBind", None)
    base = getattr(bind, "nixlAgentConfig", None)
    if base is None or "pthrDelay" not in dir(base):
        log.warning("this nixl wrapper has no pthrDelay to set: its progress thread will spin while idle")
        return nixl_agent(agent_name, config)

    class _Config(base):  # type: ignore[misc, valid-type]
        def __setattr__(self, name: str, value: Any) -> None:
            super().__setattr__(name, progress_wait_us if name == "pthrDelay" else value)

    with _agent_lock:
        api.nixlBind = _Module(bind, nixlAgentConfig=_Config)
        try:
            return nixl_agent(agent_name, config)
        finally:
            api.nixlBind = bind


def _mem_type(device: str) -> str:
    return "VRAM" if device == "cuda" else "DRAM"


def _block_descs(base: int, layout: KVLayout, device_index: int) -> np.ndarray:
    """``[num_layers * num_blocks, 3]`` (address, length, device) rows, layer-major."""
    layers = np.arange(layout.num_layers, dtype=np.uint64).reshape(-1, 1)
    blocks = np.arange(layout.num_blocks, dtype=np.uint64).reshape(1, -1)
    addr = (base + layers * layout.layer_stride_bytes + blocks * layout.block_bytes_per_layer).reshape(-1)
    descs = np.empty((addr.size, 3), dtype=np.uint64)
    descs[:, 0] = addr
    descs[:, 1] = layout.block_bytes_per_layer
    descs[:, 2] = device_index
    return descs


def _as_str(name: str | bytes) -> str:
    return name.decode() if isinstance(name, bytes) else name


class NixlTransport(KVTransport):
    """`KVTransport` over a NIXL agent (UCX backend by default)."""

    name = "nixl"
    supports_ranges = False  # posts prepared per-(layer, block) descriptors, never head slices

    def __init__(self, agent_name: str, options: TransportOptions | None = None) -> None:
        super().__init__(agent_name, options)
        config = nixl_agent_config(
            backends=list(self.options.nixl_backends), capture_telemetry=self.options.nixl_telemetry
        )
        bind_ucx_to(self.options.host)
        self._agent = _make_agent(agent_name, config, self.options.nixl_progress_wait_us)
        missing = [b for b in self.options.nixl_backends if b not in self._agent.backends]
        if missing:
            raise KVTransferError(
                f"NIXL could not start backend(s) {missing}; plugins found: {self._agent.get_plugin_list()}"
            )
        self._reg_descs: Any = None
        self._local_dlist: Any = None
        self._remote_dlists: dict[str, Any] = {}
        self._inflight: dict[int, TransferHandle] = {}

    # ------------------------------------------------------------------ set-up
    def _register(self, pool: KVCachePool) -> None:
        self._reg_descs = self._agent.register_memory(pool.kv)
        device = pool.kv.device  # the tensor's: always carries the CUDA index
        descs = _block_descs(pool.data_ptr(), pool.layout, device.index or 0)
        self._local_dlist = self._agent.prep_xfer_dlist(_NIXL_INIT_AGENT, descs, _mem_type(device.type))

    def _endpoint(self) -> dict[str, Any]:
        return {"agent_md": self._agent.get_agent_metadata()}

    def _connect(self, info: PeerInfo) -> None:
        agent_md = info.endpoint.get("agent_md")
        if not isinstance(agent_md, bytes):
            raise KVTransferError(f"peer {info.agent!r} sent no NIXL agent metadata")
        try:
            loaded = _as_str(self._agent.add_remote_agent(agent_md))
        except Exception as exc:  # nixl raises its own binding errors
            raise KVTransferError(f"NIXL refused the metadata of peer {info.agent!r}: {exc}") from exc
        if loaded != info.agent:
            self._agent.remove_remote_agent(loaded)
            raise KVTransferError(f"NIXL metadata names agent {loaded!r}, the handshake says {info.agent!r}")
        descs = _block_descs(info.base_addr, info.layout, info.device_index)
        try:
            self._remote_dlists[info.agent] = self._agent.prep_xfer_dlist(
                info.agent, descs, _mem_type(info.device)
            )
        except Exception as exc:
            self._agent.remove_remote_agent(info.agent)
            raise KVTransferError(f"NIXL cannot reach the pool of peer {info.agent!r}: {exc}") from exc

    def _disconnect(self, peer: str) -> None:
        for handle in [h for h in self._inflight.values() if h.peer == peer]:
            self._fail(handle, f"peer {peer!r} was removed")
        dlist = self._remote_dlists.pop(peer, None)
        if dlist is not None:
            dlist.release()
        with contextlib.suppress(Exception):  # already invalidated by NIXL after a disconnect
            self._agent.remove_remote_agent(peer)

    # ------------------------------------------------------------------ transfers
    def _start(
        self, handle: TransferHandle, info: PeerInfo, plan: TransferPlan, notify: bytes | None
    ) -> None:
        assert self._pool is not None
        local_idx = descriptors.block_indices(plan.local_blocks, plan.layers, self._pool.num_blocks)
        remote_idx = descriptors.block_indices(plan.remote_blocks, plan.layers, info.layout.num_blocks)
        try:
            xfer = self._agent.make_prepped_xfer(
                plan.op.value, self._local_dlist, local_idx, self._remote_dlists[info.agent], remote_idx,
                notify or b"",
            )
        except Exception as exc:
            why = f"NIXL could not create the {plan.op.value} to {info.agent!r}: {exc}"
            raise TransferFailedError(why) from exc
        handle.state = xfer
        self._inflight[handle.id] = handle
        try:
            status = self._agent.transfer(xfer)
        except Exception as exc:  # e.g. nixlRemoteDisconnectError when the peer died
            self._release(handle)
            why = f"NIXL {plan.op.value} to {info.agent!r} failed to post: {exc}"
            raise TransferFailedError(why) from exc
        if status == "ERR":
            self._release(handle)
            raise TransferFailedError(f"NIXL {plan.op.value} to {info.agent!r} failed to post")

    def _check(self, handle: TransferHandle) -> bool:
        if handle.id not in self._inflight:
            raise TransferFailedError(f"transfer {handle.id} to {handle.peer!r} was abandoned")
        try:
            status = self._agent.check_xfer_state(handle.state)
        except Exception as exc:
            status = f"ERR ({exc})"
        if status == "PROC":
            return False
        if status == "DONE" and self.options.nixl_telemetry:
            handle.backend_descriptors = int(self._agent.get_xfer_telemetry(handle.state).descCount)
        self._release(handle)
        if status != "DONE":
            raise TransferFailedError(f"NIXL {handle.op.value} to {handle.peer!r} failed: {status}")
        return True

    def notify(self, peer: str, msg: bytes) -> None:
        self._peer(peer)
        try:
            self._agent.send_notif(peer, msg)
        except Exception as exc:
            raise TransferFailedError(f"NIXL notification to {peer!r} failed: {exc}") from exc

    def poll_notifications(self) -> list[tuple[str, bytes]]:
        if self._agent is None:
            return []
        notifs = self._agent.get_new_notifs()
        return [(_as_str(peer), bytes(m)) for peer, msgs in notifs.items() for m in msgs]

    # ------------------------------------------------------------------ teardown
    def _release(self, handle: TransferHandle) -> None:
        self._inflight.pop(handle.id, None)
        # if it cannot be cancelled, NIXL keeps it on its leak list and frees it with the agent
        with contextlib.suppress(Exception):
            handle.state.release()

    def _fail(self, handle: TransferHandle, why: str) -> None:
        self._release(handle)
        handle.finished, handle.error = True, TransferFailedError(f"{handle.op.value} {handle.id}: {why}")

    def _shutdown(self) -> None:
        for handle in list(self._inflight.values()):
            self._fail(handle, "transport closed")
        if self._local_dlist is not None:
            self._local_dlist.release()
            self._local_dlist = None
        if self._reg_descs is not None:
            self._agent.deregister_memory(self._reg_descs)
            self._reg_descs = None
        self._agent = None  # the agent's destructor stops its UCX workers and threads
