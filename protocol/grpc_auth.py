"""The cluster token on the worker API: a server interceptor that checks it, channels that send it.

Workers are not public endpoints (the router is), but they accept KV-writing instructions, so
every call must carry the shared cluster token in the ``x-splitserve-token`` metadata header.
An empty server token disables the check (a single-user development set-up).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
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


def token_channel(address: str, token: str) -> grpc.Channel:
    """An insecure channel (workers sit on the cluster network) that sends the cluster token."""
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.intercept_channel(channel, _TokenClientInterceptor(token))


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """For asyncio channels, which take metadata per call."""
    return ((TOKEN_HEADER, token),)
