"""Errors of the KV transport layer.

One base class, so a worker can catch every transport failure of a request in one place and
free that request's blocks; the subclasses say what went wrong and what to do about it.
"""

from __future__ import annotations

from collections.abc import Mapping


class KVTransferError(RuntimeError):
    """Base of every error raised by `kvtransfer`."""


class UnknownTransportError(KVTransferError, ValueError):
    """A backend name that is not in the registry (a config typo, caught at start-up)."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown KV transport {name!r}; known transports: {', '.join(sorted(known))}")
        self.name = name
        self.known = sorted(known)


class TransportUnavailableError(KVTransferError, ImportError):
    """A registered backend whose package is missing or does not load on this machine."""

    def __init__(self, name: str, requirement: str, cause: BaseException) -> None:
        super().__init__(
            f"KV transport {name!r} needs the package {requirement!r} "
            f"(pip install '{requirement}'); importing it failed: {cause}"
        )
        self.name = name
        self.requirement = requirement


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


class UnknownPeerError(KVTransferError, KeyError):
    """A transfer addressed to a peer that was never added (or was removed)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TransferFailedError(KVTransferError):
    """The transfer did not complete: the peer disconnected, rejected it, or the backend failed.

    The destination blocks hold undefined bytes; the request must be retried or aborted.
    """


class TransferTimeoutError(KVTransferError, TimeoutError):
    """`wait` ran out of time; the transfer may still be in flight (see `KVTransport.wait`)."""
