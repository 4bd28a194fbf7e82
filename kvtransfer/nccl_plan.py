"""What an NCCL transfer posts: matching send and receive lists, a pure function.

NCCL point-to-point has no tags: inside one ``ncclGroupStart/End`` the n-th ``ncclSend`` to a
peer meets that peer's n-th ``ncclRecv``. So both sides must derive the *same ordered list*
of operations from the same byte ranges: the sender walks its local offsets, the receiver the
remote ones, range by range, each split into pieces of at most ``max_bytes`` (NCCL counts are
elements; pieces also bound one operation's share of the dedicated stream).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from kvtransfer.descriptors import ByteRanges

MAX_OP_BYTES = 256 << 20


class NcclOps(NamedTuple):
    """``count`` ops: the sender posts ``ncclSend(send[i], nbytes[i])``, the receiver
    ``ncclRecv(recv[i], nbytes[i])``, both in this order, in one group."""

    send: np.ndarray  # int64 byte offsets into the sender's pool
    recv: np.ndarray  # int64 byte offsets into the receiver's pool
    nbytes: np.ndarray  # int64

    def __len__(self) -> int:
        return int(self.nbytes.shape[0])


def plan_ops(src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray, max_bytes: int = MAX_OP_BYTES) -> NcclOps:
    """Split each range ``src[i] -> dst[i]`` of ``nbytes[i]`` into pieces of at most ``max_bytes``."""
    if max_bytes <= 0:
        raise ValueError("max_bytes must be positive")
    src, dst, nbytes = (np.asarray(a, dtype=np.int64).reshape(-1) for a in (src, dst, nbytes))
    if not (src.shape == dst.shape == nbytes.shape):
        raise ValueError("src, dst and nbytes must have the same length")
    if (nbytes <= 0).any():
        raise ValueError("every range must be non-empty")
    pieces = -(-nbytes // max_bytes)  # ceil
    starts = np.repeat(np.cumsum(pieces) - pieces, pieces)
    k = np.arange(int(pieces.sum()), dtype=np.int64) - starts  # piece index within its range
    owner = np.repeat(np.arange(nbytes.size), pieces)
    offset = k * max_bytes
    size = np.minimum(max_bytes, nbytes[owner] - offset)
    return NcclOps(src[owner] + offset, dst[owner] + offset, size)


def write_ops(ranges: ByteRanges, max_bytes: int = MAX_OP_BYTES) -> NcclOps:
    """A push: we send from our (``local``) offsets into the peer's (``remote``) ones."""
    return plan_ops(ranges.local, ranges.remote, ranges.nbytes, max_bytes)


def read_ops(ranges: ByteRanges, max_bytes: int = MAX_OP_BYTES) -> NcclOps:
    """A pull: the peer sends from its (``remote``) offsets into our (``local``) ones."""
    return plan_ops(ranges.remote, ranges.local, ranges.nbytes, max_bytes)
