"""Errors of the KV transport layer.

One base class, so a worker can catch every transport failure of a request in one place and
free that request's blocks; the subclasses say what went wrong and what to do about it.
"""

from __future__ import annotations

from protocol.errors import IncompatiblePeerError, KVTransferError, PeerAuthError, ProtocolError


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


__all__ = [
    "IncompatiblePeerError", "KVTransferError", "PeerAuthError", "ProtocolError", "TransferFailedError",
    "TransferTimeoutError", "TransportUnavailableError", "UnknownPeerError", "UnknownTransportError",
]
