"""The cluster token on the worker API: a server interceptor that checks it, channels that send it;
and optional TLS for those channels.

Workers are not public endpoints (the router is), but they accept KV-writing instructions, so
every call must carry the shared cluster token in the ``x-splitserve-token`` metadata header.
An empty server token disables the check (a single-user development set-up).

On a network others can sniff, the token (and the prompts) must not cross in clear text:
`GrpcTls` names PEM files, a worker serves TLS when it has a certificate and key, and every
client verifies the worker against the CA (a server it cannot verify never sees the token).
A worker process sets its `GrpcTls` once (`set_process_tls`, from its spec), so every client
it opens (to prefill peers, for lease renewals) uses it without each call site passing it.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

TOKEN_HEADER = "x-splitserve-token"

# keep messages small but allow big prompts (token ids) and transport metadata blobs
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 2**20),
    ("grpc.max_send_message_length", 64 * 2**20),
]


class TokenInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or not self._token:
            return handler
        sent = dict(details.invocation_metadata or ()).get(TOKEN_HEADER, "")
        sent_b = sent.encode() if isinstance(sent, str) else bytes(sent)
        if hmac.compare_digest(sent_b, self._token):
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    def deny(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong cluster token ({TOKEN_HEADER})")

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(deny, **kw)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(deny, **kw)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(lambda _it, ctx: deny(None, ctx), **kw)
    return grpc.stream_stream_rpc_method_handler(lambda _it, ctx: deny(None, ctx), **kw)


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class _TokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._md = (TOKEN_HEADER, token)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _ClientCallDetails(details, [*(details.metadata or ()), self._md])

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails,
                              request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails,
                               request: Any) -> Any:
        return continuation(self._details(details), request)


@dataclass(frozen=True)
class GrpcTls:
    """PEM file paths: ``ca_file`` verifies workers (clients); ``cert_file`` + ``key_file`` serve."""

    ca_file: str
    cert_file: str = ""
    key_file: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("tls cert_file and key_file: give both or neither")

    def server_credentials(self) -> grpc.ServerCredentials:
        if not self.cert_file:
            raise ValueError("tls cert_file and key_file: required to serve TLS")
        key, cert = Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes()
        return grpc.ssl_server_credentials([(key, cert)])

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=Path(self.ca_file).read_bytes())


_process_tls: GrpcTls | None = None


def set_process_tls(tls: GrpcTls | None) -> None:
    """The TLS every client of this process uses unless given one (a worker: from its spec)."""
    global _process_tls
    _process_tls = tls


def process_tls() -> GrpcTls | None:
    return _process_tls


def open_channel(address: str, tls: GrpcTls | None = None) -> grpc.Channel:
    """A blocking channel: TLS verified against ``tls.ca_file`` (default: the process's), else insecure."""
    tls = tls or _process_tls
    if tls is None:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS)


def open_aio_channel(address: str, tls: GrpcTls | None = None) -> grpc.aio.Channel:
    """`open_channel` for grpc.aio (create it on the event loop that uses it)."""
    tls = tls or _process_tls
    if tls is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS)


def token_channel(address: str, token: str, tls: GrpcTls | None = None) -> grpc.Channel:
    """A channel that sends the cluster token (over TLS when there is a `GrpcTls`, see `open_channel`)."""
    return grpc.intercept_channel(open_channel(address, tls), _TokenClientInterceptor(token))


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """For asyncio channels, which take metadata per call."""
    return ((TOKEN_HEADER, token),)
