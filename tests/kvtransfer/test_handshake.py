"""Handshake metadata: signed msgpack round trip, tampering, malformed input, compat keys."""

from __future__ import annotations

import msgpack
import pytest
import torch

from engine.kv_cache_pool import KVLayout
from kvtransfer import IncompatiblePeerError, PeerAuthError, ProtocolError
from protocol import kv_handshake as handshake
from protocol.kv_handshake import PeerInfo

LAYOUT = KVLayout(num_layers=2, num_blocks=8, num_kv_heads=2, block_size=16, head_dim=64, dtype=torch.float16)


def info(**compat: object) -> PeerInfo:
    return PeerInfo("decode-0", "tcp", LAYOUT, handshake.full_compat(LAYOUT, {"model": "m", **compat}),
                    "cpu", 0, 0x7F0000001000, LAYOUT.total_bytes, {"host": "127.0.0.1", "port": 5555})


def test_round_trip() -> None:
    assert handshake.decode(handshake.encode(info(), "tok"), "tok") == info()


def test_tampered_or_unsigned_metadata_is_refused() -> None:
    outer = msgpack.unpackb(handshake.encode(info(), "tok"))
    body = msgpack.unpackb(outer["body"])
    body["region"][0] = 0xDEAD0000  # point a peer at other memory
    forged = msgpack.packb({"body": msgpack.packb(body), "mac": outer["mac"]})
    with pytest.raises(PeerAuthError):
        handshake.decode(forged, "tok")
    with pytest.raises(PeerAuthError):
        handshake.decode(handshake.encode(info(), "tok"), "other-token")


@pytest.mark.parametrize("data", [b"", b"\x80\x04\x95 pickle", msgpack.packb([1, 2]), b"\xc1"])
def test_garbage_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        handshake.decode(data, "tok")


def test_region_must_match_layout() -> None:
    bad = PeerInfo(**{**info().__dict__, "nbytes": 1})
    with pytest.raises(ProtocolError, match="layout says"):
        handshake.decode(handshake.encode(bad, "tok"), "tok")


def test_compat_differences_name_every_field() -> None:
    ours, theirs = info(tp_size=2).compat, info(tp_size=1, quant="fp8").compat
    with pytest.raises(IncompatiblePeerError) as err:
        handshake.check_compat("prefill-0", ours, theirs)
    assert err.value.differences == {"tp_size": (2, 1), "quant": (None, "fp8")}
    assert handshake.compat_digest(ours) == handshake.compat_digest(dict(reversed(list(ours.items()))))


def test_compat_values_must_be_scalars() -> None:
    with pytest.raises(TypeError, match="compat entries"):
        handshake.full_compat(LAYOUT, {"model": ["a", "b"]})
