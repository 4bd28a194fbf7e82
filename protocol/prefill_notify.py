"""The notification a prefill worker sends a decode worker through the KV transport.

It rides the transport (not gRPC) because it must arrive *after* the prompt's KV landed, and
only the transport can order a message behind its own writes. msgpack, never pickle: decode
accepts ints, floats, strings and lists from its peer, and checks their types here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack


class BadNotificationError(ValueError):
    """A peer sent bytes that are not a prefill notification."""


@dataclass(frozen=True)
class PrefillDone:
    """The prompt's KV is in decode's blocks; ``token`` is the first sampled token."""

    request_id: str
    token: int
    logprob: float = 0.0
    top: dict[int, float] = field(default_factory=dict)
    cached_tokens: int = 0  # prompt tokens the prefill worker took from its own prefix cache
    sent_at: float = 0.0  # prefill's time.time() when it sent this (hand-over measurement)


@dataclass(frozen=True)
class PrefillFailed:
    """The prefill worker gave up; it no longer writes into decode's blocks."""

    request_id: str
    error: str


PrefillNotification = PrefillDone | PrefillFailed


def encode(n: PrefillNotification) -> bytes:
    if isinstance(n, PrefillDone):
        obj = {
            "kind": "done", "rid": n.request_id, "tok": n.token, "lp": n.logprob,
            "top": [[t, lp] for t, lp in n.top.items()], "cached": n.cached_tokens, "at": n.sent_at,
        }
    else:
        obj = {"kind": "failed", "rid": n.request_id, "error": n.error}
    return msgpack.packb(obj, use_bin_type=True)


def decode(data: bytes) -> PrefillNotification:
    try:
        obj = msgpack.unpackb(data, raw=False)
        kind, rid = obj["kind"], obj["rid"]
        if not isinstance(rid, str):
            raise TypeError("rid")
        if kind == "failed":
            return PrefillFailed(rid, str(obj["error"]))
        if kind != "done":
            raise ValueError(kind)
        top = {int(t): float(lp) for t, lp in obj["top"]}
        return PrefillDone(rid, int(obj["tok"]), float(obj["lp"]), top, int(obj["cached"]), float(obj["at"]))
    except Exception as e:  # any malformed field: one clear error type for the caller
        raise BadNotificationError(f"not a prefill notification: {e!r}") from None
