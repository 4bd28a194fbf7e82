"""Typed messages that workers and the router exchange through the Redis control plane.

They cross process (and machine) boundaries, so each has an explicit `to_wire`/`from_wire`
pair over plain msgpack-able values: nothing here is ever pickled, and a peer can only hand
us ints, floats, strings, bytes, lists and maps.

Anyone who can write to Redis could otherwise register a worker at an address of their
choosing and collect the cluster token the router sends with every call. So a cluster with a
token `seal`s every record: HMAC-SHA256, keyed with the token, over the key the record is
stored under and its exact bytes (the key binds it: a load record cannot pass for a worker
record, nor one worker's record for another's). `unseal` gives the bytes back only when the
MAC verifies.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import msgpack

PoolName = Literal["prefill", "decode"]
POOLS: tuple[PoolName, ...] = ("prefill", "decode")

BlockHash = int | bytes
"""A prefix block hash as published by the engine (chained: it identifies the whole prefix)."""


SEAL_MARK = b"\xc1"
"""0xc1 is never used by msgpack, so a sealed value cannot be mistaken for a bare record."""
_MAC_LEN = hashlib.sha256().digest_size


def record_mac(token: str, key: str, payload: bytes) -> bytes:
    return hmac.new(token.encode(), key.encode() + b"\0" + payload, hashlib.sha256).digest()


def seal(token: str, key: str, payload: bytes) -> bytes:
    """``payload`` as stored under ``key``: MAC'd when there is a token, bare when there is none."""
    if not token:
        return payload
    return SEAL_MARK + record_mac(token, key, payload) + payload


def unseal(token: str, key: str, data: bytes) -> bytes | None:
    """The payload of a value read from ``key``; None when a token is set and the MAC is missing
    or wrong. Without a token (a development set-up) nothing can be checked: any record passes."""
    sealed = data[:1] == SEAL_MARK and len(data) > _MAC_LEN
    if not token:
        return data[1 + _MAC_LEN :] if sealed else data
    if not sealed:
        return None
    mac, payload = data[1 : 1 + _MAC_LEN], data[1 + _MAC_LEN :]
    return payload if hmac.compare_digest(mac, record_mac(token, key, payload)) else None


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    # strict_map_key=False: KV hashes may be map keys; raw=False: str stays str
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker announces once: who it is, where to reach it, how much it can hold."""

    worker_id: str
    pool: PoolName
    address: str  # host:port of its gRPC endpoint
    num_blocks: int  # KV blocks in its cache (capacity, per rank 0)
    block_size: int
    max_num_seqs: int = 0  # decode batch limit; 0 for prefill workers
    max_batched_tokens: int = 0  # prefill tokens per step
    # transport agent name, backend, connection blob...: opaque to the router, read by peers
    transport: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"pool: must be one of {POOLS}, got {self.pool!r}")

    def to_wire(self) -> bytes:
        return pack(asdict(self))

    @classmethod
    def from_wire(cls, data: bytes) -> WorkerInfo:
        d = unpack(data)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class LoadSnapshot:
    """A worker's load at one heartbeat: what the router's cost model weighs."""

    queued_requests: int = 0
    queued_prefill_tokens: int = 0  # prompt tokens waiting to be computed
    running_requests: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    integrity_ok: bool = True  # the worker's last idle BlockManager.check_integrity() passed
    timestamp: float = field(default_factory=time.time)
    draining: bool = False  # finishing what it has before it stops: the router sends it nothing new

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use (cached-but-free blocks count as free)."""
        if self.total_blocks <= 0:
            return 0.0
        return 1.0 - self.free_blocks / self.total_blocks

    def to_wire(self) -> bytes:
        return pack(asdict(self))

    @classmethod
    def from_wire(cls, data: bytes) -> LoadSnapshot:
        d = unpack(data)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


KVEventKind = Literal["stored", "removed", "cleared"]


@dataclass(frozen=True)
class KVEvent:
    """A change to a worker's prefix cache, in the order it happened.

    ``stored``: the blocks became reusable by hash; ``removed``: they were evicted;
    ``cleared``: the whole cache was dropped (restart, reset), ``block_hashes`` is empty.
    """

    kind: KVEventKind
    block_hashes: tuple[BlockHash, ...] = ()

    def to_obj(self) -> list[Any]:
        return [self.kind, list(self.block_hashes)]

    @classmethod
    def from_obj(cls, obj: list[Any]) -> KVEvent:
        kind, hashes = obj
        if kind not in ("stored", "removed", "cleared"):
            raise ValueError(f"unknown KV event kind {kind!r}")
        return cls(kind, tuple(hashes))


@dataclass(frozen=True)
class KVEventBatch:
    """One publish call's events, as read back from the stream."""

    stream_id: str
    worker_id: str
    events: tuple[KVEvent, ...]
