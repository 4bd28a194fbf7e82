"""Chained content hashes of KV blocks: the prefix cache's keys and the router's prefix index.

A block's hash covers its parent's hash and its own token ids, so one hash names a whole
prefix (a path in a radix tree, folded into one number). The router computes the same hashes
from token ids to find which worker already holds a prompt's prefix, so the function must be
identical in every process and on every machine: no Python ``hash()`` (salted per process),
no pickling, a fixed byte order. BLAKE2b is in the standard library, fast, and has no
practical collisions at 64 bits for the number of blocks a cluster ever holds.

Byte layout hashed (little-endian)::

    root block:   b"\\x00"             + int32 token ids
    other blocks: b"\\x01" + uint64(parent) + int32 token ids

The marker byte keeps a root block distinct from a block whose parent hash happens to be 0.
Hashes are unsigned 64-bit ints (fit msgpack, protobuf uint64 and Redis).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from hashlib import blake2b

HASH_BITS = 64
_ROOT = b"\x00"
_CHILD = b"\x01"
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Hash of one block given its parent's hash (``None`` for the first block of a sequence)."""
    h = blake2b(digest_size=HASH_BITS // 8)
    if parent_hash is None:
        h.update(_ROOT)
    else:
        h.update(_CHILD)
        h.update(struct.pack("<Q", parent_hash & 0xFFFF_FFFF_FFFF_FFFF))
    try:
        h.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    except struct.error:
        bad = next((t for t in token_ids if not _INT32_MIN <= int(t) <= _INT32_MAX), None)
        raise ValueError(f"token_ids: {bad!r} does not fit in int32") from None
    return int.from_bytes(h.digest(), "little")


def iter_block_hashes(
    token_ids: Sequence[int], block_size: int, parent_hash: int | None = None
) -> Iterator[int]:
    """Lazily hash the full blocks of ``token_ids``; callers that stop at the first cache miss
    don't pay for hashing the rest of a long prompt."""
    if block_size < 1:
        raise ValueError(f"block_size: must be >= 1, got {block_size}")
    parent = parent_hash
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        yield parent


def prompt_block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Hashes of every full block of a prompt (a trailing partial block has none)."""
    return list(iter_block_hashes(token_ids, block_size))
