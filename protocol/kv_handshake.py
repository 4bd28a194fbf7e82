"""What two workers exchange before any KV moves: pool metadata, signed, in msgpack.

A worker's `metadata()` is the only thing a peer needs to reach its pool: the backend's
endpoint (NIXL agent metadata, or a TCP host/port), the pool's base address and length, its
`KVLayout`, and the compatibility key. The bytes travel through the worker handshake (gRPC),
are signed with the cluster token (HMAC-SHA256) so a peer without the token cannot get itself
added, and are decoded with msgpack only: nothing a peer sends is ever unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from engine.kv_cache_pool import KVLayout
from protocol.errors import IncompatiblePeerError, PeerAuthError, ProtocolError

WIRE_VERSION = 1
_MAX_METADATA_BYTES = 16 << 20  # NIXL agent metadata is a few KiB; anything huge is hostile

CompatValue = str | int | float | bool | None
Compat = dict[str, CompatValue]


@dataclass(frozen=True)
class PeerInfo:
    """A decoded, verified peer: everything a backend needs to address its pool."""

    agent: str
    backend: str
    layout: KVLayout
    compat: Compat
    device: str  # "cpu" or "cuda"
    device_index: int
    base_addr: int
    nbytes: int
    endpoint: dict[str, Any]  # backend-specific: {"agent_md": bytes} or {"host": str, "port": int}


def full_compat(layout: KVLayout, compat: dict[str, Any]) -> Compat:
    """The caller's key (model, tp split, ...) plus the layout fields every backend depends on.

    ``num_blocks`` is left out on purpose: pools of different sizes interoperate (block ids
    are checked against the peer's own count).
    """
    out = group_compat(compat)
    out.update({
        "kv.num_layers": layout.num_layers,
        "kv.num_kv_heads": layout.num_kv_heads,
        "kv.block_size": layout.block_size,
        "kv.head_dim": layout.head_dim,
        "kv.dtype": str(layout.dtype),
        "kv.block_bytes": layout.block_bytes_per_layer,
    })
    return out


def group_compat(compat: dict[str, Any]) -> Compat:
    """The key of a rank that exchanges head/layer slices: the caller's entries only (model and
    the whole model's KV geometry), the same on every rank of every group split of that model."""
    out: Compat = {}
    for key, value in compat.items():
        if not isinstance(key, str) or not (value is None or isinstance(value, str | int | float | bool)):
            raise TypeError(f"compat entries must be str -> str/int/float/bool/None, got {key!r}: {value!r}")
        out[key] = value
    return out


def compat_differences(ours: Compat, theirs: Compat) -> dict[str, tuple[CompatValue, CompatValue]]:
    """Every key whose values differ, a key missing on one side counting as ``None``."""
    keys = set(ours) | set(theirs)
    return {k: (ours.get(k), theirs.get(k)) for k in keys if ours.get(k) != theirs.get(k)}


def check_compat(peer: str, ours: Compat, theirs: Compat) -> None:
    diff = compat_differences(ours, theirs)
    if diff:
        raise IncompatiblePeerError(peer, diff)


def compat_digest(compat: Compat) -> bytes:
    """Order-independent digest, for the TCP hello (a second check that costs 32 bytes)."""
    return hashlib.sha256(msgpack.packb(sorted(compat.items()), use_bin_type=True)).digest()


def sign(token: str, payload: bytes) -> bytes:
    return hmac.new(token.encode(), payload, hashlib.sha256).digest()


def encode(info: PeerInfo, token: str) -> bytes:
    lay = info.layout
    body = msgpack.packb(
        {
            "v": WIRE_VERSION,
            "agent": info.agent,
            "backend": info.backend,
            "layout": [lay.num_layers, lay.num_blocks, lay.num_kv_heads, lay.block_size, lay.head_dim,
                       str(lay.dtype)],
            "compat": info.compat,
            "device": [info.device, info.device_index],
            "region": [info.base_addr, info.nbytes],
            "endpoint": info.endpoint,
        },
        use_bin_type=True,
    )
    return msgpack.packb({"body": body, "mac": sign(token, body)}, use_bin_type=True)


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=_MAX_METADATA_BYTES)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ProtocolError(f"peer metadata is not valid msgpack: {exc}") from exc


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ProtocolError(f"peer metadata names an unknown dtype {name!r}")
    return dtype


def decode(data: bytes, token: str) -> PeerInfo:
    """Verify the signature, then rebuild `PeerInfo`; raises `PeerAuthError` / `ProtocolError`."""
    if not isinstance(data, bytes | bytearray) or len(data) > _MAX_METADATA_BYTES:
        raise ProtocolError("peer metadata must be bytes of a sane size")
    outer = _unpack(bytes(data))
    if not isinstance(outer, dict) or not isinstance(outer.get("body"), bytes):
        raise ProtocolError("peer metadata has no signed body")
    if not hmac.compare_digest(sign(token, outer["body"]), outer.get("mac") or b""):
        raise PeerAuthError("peer metadata is not signed with our cluster token (wrong or missing token)")
    m = _unpack(outer["body"])
    try:
        if m["v"] != WIRE_VERSION:
            raise ProtocolError(f"peer speaks handshake version {m['v']}, we speak {WIRE_VERSION}")
        nl, nb, heads, bs, hd, dtype = m["layout"]
        device, index = m["device"]
        base, nbytes = m["region"]
        layout = KVLayout(int(nl), int(nb), int(heads), int(bs), int(hd), _dtype(str(dtype)))
        info = PeerInfo(str(m["agent"]), str(m["backend"]), layout, dict(m["compat"]), str(device),
                        int(index), int(base), int(nbytes), dict(m["endpoint"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"peer metadata is malformed: {exc!r}") from exc
    if info.nbytes != layout.total_bytes:
        raise ProtocolError(f"peer region is {info.nbytes} bytes, its layout says {layout.total_bytes}")
    return info
