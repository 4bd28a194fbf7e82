"""Wire format and pool byte I/O of the TCP backend.

A frame is ``u32 big-endian header length | msgpack header | raw payload``; the header says
how many payload bytes follow (as byte ranges of the pool). Headers are small, bounded and
decoded with msgpack only, never pickle. Range lists travel as little-endian int64 arrays
(``np.frombuffer``), so a 32-layer push costs one header, not thousands of msgpack ints.

Frame types (header ``"t"``), initiator → owner: ``w`` write (+payload), ``r`` read request,
``n`` notification; owner → initiator: ``a`` write ack (data is in the pool), ``d`` read data
(+payload), ``e`` error. Connection set-up: owner sends ``c`` (challenge nonce), initiator
answers ``h`` (agent name, HMAC of the nonce with the cluster token, compat digest), owner
answers ``ok`` or ``e`` and closes.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
from typing import Any

import msgpack
import numpy as np
import torch

from engine.kv_cache_pool import KVCachePool
from kvtransfer.errors import ProtocolError

MAX_HEADER_BYTES = 1 << 24  # 16 MiB: a range list for ~1M descriptors; more is hostile
_LEN = struct.Struct(">I")
_STAGE_BYTES = 64 << 20  # pinned bounce buffer per connection for CUDA pools


def hello_mac(token: str, nonce: bytes, agent: str) -> bytes:
    msg = b"splitserve-kv-hello\0" + nonce + agent.encode()
    return hmac.new(token.encode(), msg, hashlib.sha256).digest()


def send_header(sock: socket.socket, header: dict[str, Any]) -> None:
    body = msgpack.packb(header, use_bin_type=True)
    sock.sendall(_LEN.pack(len(body)) + body)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf))
    return bytes(buf)


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed the connection")
        got += n


def recv_header(sock: socket.socket) -> dict[str, Any]:
    (n,) = _LEN.unpack(recv_exact(sock, _LEN.size))
    if n > MAX_HEADER_BYTES:
        raise ProtocolError(f"frame header of {n} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(recv_exact(sock, n), raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ProtocolError(f"frame header is not valid msgpack: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("t"), str):
        raise ProtocolError("frame header must be a map with a string 't'")
    return header


def pack_ranges(offsets: np.ndarray, nbytes: np.ndarray) -> dict[str, bytes]:
    return {"o": offsets.astype("<i8").tobytes(), "n": nbytes.astype("<i8").tobytes()}


def unpack_ranges(header: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    o, n = header.get("o"), header.get("n")
    if not isinstance(o, bytes) or not isinstance(n, bytes) or len(o) != len(n) or len(o) % 8:
        raise ProtocolError("frame has malformed byte ranges")
    return np.frombuffer(o, dtype="<i8").astype(np.int64), np.frombuffer(n, dtype="<i8").astype(np.int64)


class PoolBytes:
    """Socket I/O straight from/to the pool's memory, at byte offsets from its base.

    CPU pools are read and written in place through a numpy view (zero copy besides the
    kernel's). CUDA pools bounce through a pinned host buffer: the last resort for machines
    without UCX, it costs a device↔host copy per byte; use NIXL on GPUs.
    """

    def __init__(self, pool: KVCachePool) -> None:
        self.nbytes = pool.layout.total_bytes
        self.block_bytes = pool.layout.block_bytes_per_layer
        self.tile_bytes = self.block_bytes // (2 * pool.layout.num_kv_heads)
        flat = pool.kv.view(torch.uint8).reshape(-1)
        self._cuda = flat.is_cuda
        self._flat = flat
        self._view = None if self._cuda else memoryview(flat.numpy())
        self._stage: torch.Tensor | None = None

    def fork(self) -> PoolBytes:
        """A twin with its own bounce buffer, for use by another thread."""
        twin = object.__new__(PoolBytes)
        twin.__dict__.update(self.__dict__)
        twin._stage = None
        return twin

    def check(self, offsets: np.ndarray, nbytes: np.ndarray) -> None:
        """Refuse ranges a peer must never ask for: outside the pool or not on head-tile boundaries
        (one K or V head of one block: the unit of writes between groups of different tp)."""
        bb = self.tile_bytes
        ok = (
            (offsets >= 0).all() and (nbytes > 0).all() and (offsets + nbytes <= self.nbytes).all()
            and not (offsets % bb).any() and not (nbytes % bb).any()
        )
        if not ok:
            raise ProtocolError("byte ranges outside the pool or not aligned to head tiles")

    def send(self, sock: socket.socket, offsets: np.ndarray, nbytes: np.ndarray) -> None:
        for off, n in zip(offsets.tolist(), nbytes.tolist()):
            if self._view is not None:
                sock.sendall(self._view[off : off + n])
                continue
            for start in range(off, off + n, _STAGE_BYTES):
                size = min(_STAGE_BYTES, off + n - start)
                stage = self._staging(size)
                stage.copy_(self._flat[start : start + size])
                sock.sendall(memoryview(stage.numpy()))

    def recv(self, sock: socket.socket, offsets: np.ndarray, nbytes: np.ndarray) -> None:
        for off, n in zip(offsets.tolist(), nbytes.tolist()):
            if self._view is not None:
                recv_into_exact(sock, self._view[off : off + n])
                continue
            for start in range(off, off + n, _STAGE_BYTES):
                size = min(_STAGE_BYTES, off + n - start)
                stage = self._staging(size)
                recv_into_exact(sock, memoryview(stage.numpy()))
                self._flat[start : start + size].copy_(stage)

    def _staging(self, size: int) -> torch.Tensor:
        if self._stage is None:
            self._stage = torch.empty(_STAGE_BYTES, dtype=torch.uint8, pin_memory=True)
        return self._stage[:size]
