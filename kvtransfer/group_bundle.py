"""A worker group's handshake metadata: its shape and every rank's transport metadata, signed.

Rank 0 of a group hands this to the other side instead of its own `metadata()`: the peer learns
which rank holds which layers and heads (`GroupShape.rank_slice`) and how to reach each rank's
pool directly. Each rank's entry is that rank's own signed transport metadata; the bundle is
signed again so that the shape cannot be swapped in transit. msgpack only, never pickle.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

import msgpack

from kvtransfer.group_slices import GroupShape
from protocol.errors import PeerAuthError, ProtocolError
from protocol.kv_handshake import sign

_MAGIC = "splitserve-kv-group/1"
_MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class GroupBundle:
    agent: str  # rank 0's agent name: the group's name as a peer
    shape: GroupShape
    ranks: list[bytes]  # rank r's transport metadata

    def encode(self, token: str) -> bytes:
        body = msgpack.packb({"m": _MAGIC, "agent": self.agent, "shape": self.shape.to_wire(),
                              "ranks": self.ranks}, use_bin_type=True)
        return msgpack.packb({"group": body, "mac": sign(token, body)}, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes, token: str) -> GroupBundle:
        """Raises `PeerAuthError` (token) or `ProtocolError` (not a group bundle, malformed)."""
        try:
            outer = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=_MAX_BYTES)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
            raise ProtocolError(f"group metadata is not valid msgpack: {e}") from e
        if not isinstance(outer, dict) or not isinstance(outer.get("group"), bytes):
            raise ProtocolError(
                "peer sent single-worker KV metadata, this worker exchanges KV between worker groups "
                "(both pools must run with kv_groups)"
            )
        if not hmac.compare_digest(sign(token, outer["group"]), outer.get("mac") or b""):
            raise PeerAuthError("group metadata is not signed with our cluster token")
        m = msgpack.unpackb(outer["group"], raw=False, strict_map_key=True, max_bin_len=_MAX_BYTES)
        try:
            if m["m"] != _MAGIC:
                raise ProtocolError(f"group metadata version {m['m']!r}, we speak {_MAGIC!r}")
            shape = GroupShape.from_wire(m["shape"])
            ranks = [bytes(r) for r in m["ranks"]]
            agent = str(m["agent"])
        except (KeyError, TypeError) as e:
            raise ProtocolError(f"group metadata is malformed: {e!r}") from e
        if len(ranks) != shape.world_size:
            raise ProtocolError(f"group metadata lists {len(ranks)} ranks for a group of {shape.world_size}")
        return cls(agent, shape, ranks)


def is_group_metadata(data: bytes) -> bool:
    try:
        outer = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=_MAX_BYTES)
    except Exception:
        return False
    return isinstance(outer, dict) and "group" in outer
