"""Wire format of the ucxx backend: tag layout, control messages, hello MAC, pool views.

Everything travels as UCX *tagged* messages (no active messages: a tagged receive lands
straight in pool memory, with no copy and no allocation by UCX):

* A 64-bit tag is ``link id (high 32 bits) | slot (low 32 bits)``. The initiator draws a
  random link id per connection; slot ``CTRL_SLOT`` carries control messages, every other
  slot one data message (a block run), numbered by the initiator in both directions.
* Each transport keeps one wildcard receive posted for the control slot of *every* link
  (``CTRL_MASK``), so a new peer needs no set-up on our side before its hello arrives, and
  one progress thread serves any number of peers.
* A control message is ``u32 little-endian length | msgpack map`` in a fixed-size buffer
  (`CTRL_BYTES`); range lists are little-endian int64 arrays (`pack_ranges`), and a transfer
  with more ranges than one message holds is split into parts (`RANGES_PER_PART`).

Control types (``"t"``): ``h`` hello (initiator → owner: agent, link, worker address, MAC),
``w`` write header, ``r`` read request, ``n`` notification, and owner → initiator: ``a``
write ack (the data is in the pool), ``e`` error. Nothing is unpickled; every range is
bounds- and block-checked before a receive is posted into the pool.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any

import msgpack
import numpy as np
import torch

from engine.kv_cache_pool import KVCachePool
from kvtransfer.errors import ProtocolError

CTRL_SLOT = 0xFFFFFFFF
CTRL_MASK = 0xFFFFFFFF  # match the control slot of any link
CTRL_BYTES = 1 << 20  # one control message at most; 16 bytes per range
RANGES_PER_PART = 32768  # 512 KiB of ranges per header, well inside CTRL_BYTES
_LEN = struct.Struct("<I")


def ctrl_tag(link: int) -> int:
    return (link << 32) | CTRL_SLOT


def data_tag(link: int, slot: int) -> int:
    return (link << 32) | (slot % CTRL_SLOT)  # wraps before ever reaching the control slot


def encode(msg: dict[str, Any]) -> np.ndarray:
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) + _LEN.size > CTRL_BYTES:
        raise ProtocolError(f"control message of {len(body)} bytes exceeds {CTRL_BYTES}")
    return np.frombuffer(_LEN.pack(len(body)) + body, dtype=np.uint8)


def decode(buf: np.ndarray) -> dict[str, Any]:
    (n,) = _LEN.unpack(buf[: _LEN.size].tobytes())
    if n > buf.size - _LEN.size:
        raise ProtocolError(f"control message claims {n} bytes")
    try:
        msg = msgpack.unpackb(buf[_LEN.size : _LEN.size + n].tobytes(), raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ProtocolError(f"control message is not valid msgpack: {exc}") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str) or not isinstance(msg.get("link"), int):
        raise ProtocolError("control message must be a map with a string 't' and an int 'link'")
    return msg


def hello_mac(token: str, owner_nonce: bytes, agent: str, link: int, address: bytes) -> bytes:
    """Binds the initiator's name, link id and worker address to the owner's per-start nonce."""
    msg = b"splitserve-ucxx-hello\0" + owner_nonce + agent.encode() + b"\0" + link.to_bytes(8, "little") + address
    return hmac.new(token.encode(), msg, hashlib.sha256).digest()


def pack_ranges(offsets: np.ndarray, nbytes: np.ndarray) -> dict[str, bytes]:
    return {"o": offsets.astype("<i8").tobytes(), "n": nbytes.astype("<i8").tobytes()}


def unpack_ranges(msg: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    o, n = msg.get("o"), msg.get("n")
    if not isinstance(o, bytes) or not isinstance(n, bytes) or len(o) != len(n) or len(o) % 8:
        raise ProtocolError("message has malformed byte ranges")
    return np.frombuffer(o, dtype="<i8").astype(np.int64), np.frombuffer(n, dtype="<i8").astype(np.int64)


class PoolViews:
    """Array-like views of pool byte ranges that UCX sends from / receives into in place.

    Host pools give numpy views (buffer protocol), CUDA pools torch views
    (``__cuda_array_interface__``): UCX moves device memory itself (CUDA IPC, cuda_copy, RDMA).
    """

    def __init__(self, pool: KVCachePool) -> None:
        self.nbytes = pool.layout.total_bytes
        self.block_bytes = pool.layout.block_bytes_per_layer
        self.tile_bytes = self.block_bytes // (2 * pool.layout.num_kv_heads)
        flat = pool.kv.view(torch.uint8).reshape(-1)
        self.is_cuda = flat.is_cuda
        self._flat: Any = flat if self.is_cuda else flat.numpy()

    def view(self, offset: int, nbytes: int) -> Any:
        return self._flat[offset : offset + nbytes]

    def check(self, offsets: np.ndarray, nbytes: np.ndarray) -> None:
        """Refuse ranges a peer must never name: outside the pool or not on head-tile boundaries
        (one K or V head of one block: the unit of writes between groups of different tp)."""
        bb = self.tile_bytes
        ok = (
            (offsets >= 0).all() and (nbytes > 0).all() and (offsets + nbytes <= self.nbytes).all()
            and not (offsets % bb).any() and not (nbytes % bb).any()
        )
        if not ok:
            raise ProtocolError("byte ranges outside the pool or not aligned to head tiles")
