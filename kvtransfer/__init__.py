"""KV transport layer: move KV blocks between worker pools (NIXL primary, TCP fallback).

    transport = create_transport("nixl", "decode-0", TransportOptions(token=cluster_token))
    transport.register_pool(pool, {"model": model_id, "tp_rank": 0, "tp_size": 1})
    peer = transport.add_peer(metadata_from_handshake)
    handle = transport.write_blocks(peer, local_blocks, remote_blocks, layers=[i])
    transport.wait(handle, timeout=cfg.transfer_timeout_s)

See `kvtransfer.base` for the contract (who pins which block until when).
"""

from __future__ import annotations

from kvtransfer.base import KVTransport, Op, TransferHandle, TransportOptions
from kvtransfer.errors import (
    IncompatiblePeerError,
    KVTransferError,
    PeerAuthError,
    ProtocolError,
    TransferFailedError,
    TransferTimeoutError,
    TransportUnavailableError,
    UnknownPeerError,
    UnknownTransportError,
)
from kvtransfer.registry import create_transport, known_transports, register_transport

__all__ = [
    "IncompatiblePeerError",
    "KVTransferError",
    "KVTransport",
    "Op",
    "PeerAuthError",
    "ProtocolError",
    "TransferFailedError",
    "TransferHandle",
    "TransferTimeoutError",
    "TransportOptions",
    "TransportUnavailableError",
    "UnknownPeerError",
    "UnknownTransportError",
    "create_transport",
    "known_transports",
    "register_transport",
]
