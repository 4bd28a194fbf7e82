"""nccl backend: block runs as grouped NCCL send/recv between two GPUs (CuPy's NCCL binding).

NCCL point-to-point needs the receiver to post a matching ``ncclRecv``, so this backend keeps
the TCP backend's control plane (authenticated connection, ordered frames, acks after the
data landed, notifications behind the data, range checks) and replaces only the byte
movement: where TCP streams a frame's payload through the socket, both ends post the same
ordered operations (`nccl_plan.plan_ops`) in one NCCL group on a dedicated CUDA stream,
and the connection's thread (never the decode step) waits for that stream.

One communicator per prefill-decode pair, created at the handshake: after the TCP hello the
initiator sends a fresh NCCL unique id over the authenticated connection and both join as
ranks 0 and 1. GPU only, refused with a clear message on a CPU (no CUDA, or a CPU pool) and
for two workers on one GPU (NCCL cannot connect two ranks of one device; ucxx uses CUDA IPC
there). CuPy is imported only when an nccl transport is created.

The prefill side writes a layer only after that layer's kernels finished (`kv_push` waits
for its CUDA event), so the dedicated stream never reads KV still being computed.
"""

from __future__ import annotations

import socket
from typing import Any

import numpy as np
import torch

from engine.kv_cache_pool import KVCachePool
from kvtransfer.base import TransportOptions
from kvtransfer.errors import KVTransferError, ProtocolError
from kvtransfer.nccl_plan import plan_ops
from kvtransfer.tcp_backend import TcpTransport
from kvtransfer.tcp_wire import PoolBytes, recv_header, send_header
from protocol.kv_handshake import PeerInfo

CPU_REFUSAL = ("the nccl KV transport moves GPU memory only and this {what}; use tcp, ucxx or mpi "
               "(kvtransfer.backend)")


def _nccl() -> Any:
    from cupy.cuda import nccl  # lazy: CuPy is a GPU-only dependency

    return nccl


def gpu_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


class NcclPoolBytes(PoolBytes):
    """`PoolBytes` whose payload moves through NCCL; ``comms`` is shared by every fork."""

    def __init__(self, pool: KVCachePool) -> None:
        super().__init__(pool)
        self.device = pool.kv.device.index or 0
        self.comms: dict[int, tuple[Any, int]] = {}  # socket fd -> (communicator, peer rank)
        self._stream: Any = None

    def fork(self) -> NcclPoolBytes:
        twin = object.__new__(NcclPoolBytes)
        twin.__dict__.update(self.__dict__)
        twin._stream = None  # a stream per thread
        return twin

    def send(self, sock: socket.socket, offsets: np.ndarray, nbytes: np.ndarray) -> None:
        self._group(sock, offsets, nbytes, send=True)

    def recv(self, sock: socket.socket, offsets: np.ndarray, nbytes: np.ndarray) -> None:
        self._group(sock, offsets, nbytes, send=False)

    def _group(self, sock: socket.socket, offsets: np.ndarray, nbytes: np.ndarray, send: bool) -> None:
        import cupy

        nccl = _nccl()
        comm, peer = self.comms[sock.fileno()]
        ops = plan_ops(offsets, offsets, nbytes)
        base = self._flat.data_ptr()
        with cupy.cuda.Device(self.device):
            if self._stream is None:
                self._stream = cupy.cuda.Stream(non_blocking=True)
            post = comm.send if send else comm.recv
            nccl.groupStart()
            for off, n in zip(ops.send.tolist(), ops.nbytes.tolist()):
                post(base + off, n, nccl.NCCL_UINT8, peer, self._stream.ptr)
            nccl.groupEnd()
            self._stream.synchronize()


class NcclTransport(TcpTransport):
    """`KVTransport` with TCP control and NCCL data (see the module docstring)."""

    name = "nccl"

    def __init__(self, agent_name: str, options: TransportOptions | None = None) -> None:
        if not torch.cuda.is_available():
            raise KVTransferError(CPU_REFUSAL.format(what="machine has no CUDA device"))
        super().__init__(agent_name, options)

    def _register(self, pool: KVCachePool) -> None:
        if not pool.kv.is_cuda:
            raise KVTransferError(CPU_REFUSAL.format(what="KV pool is in host memory"))
        self._bytes = NcclPoolBytes(pool)

    def _endpoint(self) -> dict[str, Any]:
        return {**super()._endpoint(), "gpu": gpu_uuid(self._nccl_bytes.device)}

    @property
    def _nccl_bytes(self) -> NcclPoolBytes:
        assert isinstance(self._bytes, NcclPoolBytes)
        return self._bytes

    def _connect(self, info: PeerInfo) -> None:
        check_gpu_peer(info, gpu_uuid(self._nccl_bytes.device))
        super()._connect(info)
        sock = self._links[info.agent].sock
        nccl = _nccl()
        uid = nccl.get_unique_id()
        send_header(sock, {"t": "u", "uid": list(uid)})
        self._nccl_bytes.comms[sock.fileno()] = (self._join(uid, rank=0), 1)

    def _authenticate(self, conn: socket.socket) -> str:
        agent = super()._authenticate(conn)
        frame = recv_header(conn)
        uid = frame.get("uid")
        if frame["t"] != "u" or not isinstance(uid, list):
            raise ProtocolError("the nccl handshake expects the communicator's unique id")
        self._nccl_bytes.comms[conn.fileno()] = (self._join(tuple(uid), rank=1), 0)
        return agent

    def _join(self, uid: Any, rank: int) -> Any:
        import cupy

        with cupy.cuda.Device(self._nccl_bytes.device):
            return _nccl().NcclCommunicator(2, uid, rank)


def check_gpu_peer(info: PeerInfo, our_gpu: str) -> None:
    """Refuse what NCCL cannot connect: a peer pool in host memory, or one on our own GPU."""
    if info.device != "cuda":
        raise KVTransferError(f"peer {info.agent!r} has its KV pool on {info.device}: "
                              + CPU_REFUSAL.format(what="peer is not on a GPU"))
    if info.endpoint.get("gpu") == our_gpu:
        raise KVTransferError(
            f"peer {info.agent!r} runs on our GPU ({our_gpu}): NCCL cannot connect two workers on one "
            "device; give them different GPUs or use kvtransfer.backend: ucxx (CUDA IPC)"
        )
