"""A worker process for transport tests: owns a `KVCachePool` and a transport, obeys commands.

The test process plays the worker handshake (it relays metadata bytes between the two
workers) and drives each worker over a `multiprocessing` pipe. The pipe is a local test
channel between our own processes; the transports themselves only ever see msgpack.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from engine.kv_cache_pool import KVCachePool, KVLayout
from kvtransfer import KVTransport, TransferHandle, TransportOptions, create_transport


@dataclass(frozen=True)
class PeerSpec:
    backend: str
    agent: str
    num_blocks: int
    seed: int
    token: str = "test-token"
    num_layers: int = 4
    num_kv_heads: int = 2
    block_size: int = 16
    head_dim: int = 64  # 16 KiB per block and layer: big enough for UCX's large-message protocol
    model: str = "tiny-llama"
    device: str = "cpu"

    @property
    def layout(self) -> KVLayout:
        return KVLayout(self.num_layers, self.num_blocks, self.num_kv_heads, self.block_size, self.head_dim,
                        torch.float32)

    @property
    def compat(self) -> dict[str, Any]:
        return {"model": self.model, "tp_rank": 0, "tp_size": 1}

    @property
    def options(self) -> TransportOptions:
        return TransportOptions(token=self.token, nixl_telemetry=self.backend == "nixl")


def make_endpoint(spec: PeerSpec) -> tuple[KVTransport, KVCachePool]:
    """Pool filled with seeded random data (so every block differs) plus its registered transport."""
    pool = KVCachePool(spec.layout, spec.device)
    gen = torch.Generator().manual_seed(spec.seed)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=gen))
    transport = create_transport(spec.backend, spec.agent, spec.options)
    transport.register_pool(pool, spec.compat)
    return transport, pool


class _Worker:
    def __init__(self, spec: PeerSpec) -> None:
        self.spec = spec
        self.transport, self.pool = make_endpoint(spec)
        self.handles: dict[int, TransferHandle] = {}
        self.commands: dict[str, Callable[..., Any]] = {
            "add_peer": self.transport.add_peer,
            "snapshot": lambda: self.pool.kv.cpu().clone(),
            "write": self.write,
            "read": self.read,
            "wait": lambda hid, timeout: self.transport.wait(self.handles[hid], timeout),
            "notify": self.transport.notify,
            "poll": self.transport.poll_notifications,
            "wait_notification": self.wait_notification,
        }

    def _submit(self, handle: TransferHandle, wait_s: float | None) -> dict[str, Any]:
        self.handles[handle.id] = handle
        if wait_s is not None:
            self.transport.wait(handle, wait_s)
        return {"id": handle.id, "nbytes": handle.nbytes, "descriptors": handle.num_descriptors,
                "merged": handle.backend_descriptors}

    def write(self, peer: str, local: Sequence[int], remote: Sequence[int], layers: Sequence[int] | None,
              notify: bytes | None, wait_s: float | None) -> dict[str, Any]:
        return self._submit(self.transport.write_blocks(peer, local, remote, layers, notify), wait_s)

    def read(self, peer: str, remote: Sequence[int], local: Sequence[int], layers: Sequence[int] | None,
             notify: bytes | None, wait_s: float | None) -> dict[str, Any]:
        return self._submit(self.transport.read_blocks(peer, remote, local, layers, notify), wait_s)

    def wait_notification(self, timeout: float) -> tuple[str, bytes, torch.Tensor]:
        """Poll until one notification arrives; snapshot the pool at that very moment."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.transport.poll_notifications()
            if got:
                return got[0][0], got[0][1], self.pool.kv.cpu().clone()
            time.sleep(0.0005)
        raise TimeoutError("no notification")


def run(spec: PeerSpec, conn: Connection) -> None:
    """Process entry point: report metadata, then serve commands until 'close' or EOF."""
    worker = _Worker(spec)
    conn.send(("ready", worker.transport.metadata(), os.getpid()))
    try:
        while True:
            try:
                cmd, args = conn.recv()
            except EOFError:
                break
            if cmd == "close":
                break
            try:
                conn.send(("ok", worker.commands[cmd](*args)))
            except Exception as exc:
                conn.send(("err", type(exc).__name__, str(exc)))
    finally:
        start = time.perf_counter()
        worker.transport.close()
        with contextlib.suppress(OSError):
            conn.send(("closed", time.perf_counter() - start))
