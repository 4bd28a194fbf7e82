"""Errors of the cross-process contracts: a peer's handshake or message that cannot be trusted.

`KVTransferError` is the base of every KV transport error; it lives here, below `kvtransfer`,
because the KV handshake (`protocol.kv_handshake`) raises three of them. `kvtransfer.errors`
re-exports them, so ``except kvtransfer.KVTransferError`` still catches every transport failure.
"""

from __future__ import annotations

from collections.abc import Mapping


class KVTransferError(RuntimeError):
    """Base of every error raised by `kvtransfer`."""

class IncompatiblePeerError(KVTransferError):
    """Two workers whose KV blocks are not interchangeable (different model, dtype, layout, split).

    Raised by the handshake instead of letting one side write bytes the other side would
    misread as KV of another shape: that would corrupt generations silently.
    """

    def __init__(self, peer: str, differences: Mapping[str, tuple[object, object]]) -> None:
        detail = "; ".join(f"{k}: ours={a!r} theirs={b!r}" for k, (a, b) in sorted(differences.items()))
        super().__init__(f"peer {peer!r} has an incompatible KV cache ({detail})")
        self.peer = peer
        self.differences = dict(differences)

class PeerAuthError(KVTransferError):
    """A peer that presented no or a wrong cluster token, or that we could not authenticate to."""

class ProtocolError(KVTransferError):
    """A malformed or out-of-bounds message from a peer (the connection is dropped)."""
