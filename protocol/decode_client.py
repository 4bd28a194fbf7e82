"""`DecodeClient` / `AsyncDecodeClient`: the one client of a decode worker's gRPC API.

The router streams through `AsyncDecodeClient` (grpc.aio, on its event loop); the data-plane
tests and tools use the blocking `DecodeClient`. Both build the request and read the stream
through `protocol.wire`, so there is one conversion each way. ``generate`` streams the decode
loop's own `TokenChunk`s. Leaving the stream early (``close()``, ``break`` out of
an ``async for``, a deadline) cancels the RPC, and the worker then aborts the request and
frees its blocks on both sides. Failures arrive as `DecodeRequestError` carrying the gRPC
status name; a rejected input raises the engine's `InvalidRequestError` (an HTTP 400 upstream).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence

import grpc

from engine.errors import InvalidRequestError, SplitserveError
from engine.sampling_params import SamplingParams
from protocol.grpc_auth import GrpcTls, open_aio_channel, token_channel, token_metadata
from protocol.proto import worker_pb2 as pb
from protocol.proto import worker_pb2_grpc as pb_grpc
from protocol.stream import PrefillTarget, TokenChunk
from protocol.wire import chunk_from_proto, generate_request_to_proto

FAILED_POOL_HEADER = "x-splitserve-failed-pool"
"""Trailing metadata a decode worker may set ("prefill" / "decode") to say whose failure it was."""


class DecodeRequestError(SplitserveError):
    """A generate call failed on the worker side or in transit; ``code`` is a grpc status name,
    ``failed_pool`` what the worker's `FAILED_POOL_HEADER` said (None when it said nothing)."""

    def __init__(self, code: str, message: str, failed_pool: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.failed_pool = failed_pool


def _failed_pool(e: grpc.RpcError) -> str | None:
    trailing = getattr(e, "trailing_metadata", None)
    for key, value in (trailing() if trailing is not None else None) or ():
        if key == FAILED_POOL_HEADER:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def error_from_rpc(e: grpc.RpcError) -> Exception:
    code = e.code()  # type: ignore[attr-defined]
    details = e.details() or ""  # type: ignore[attr-defined]
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(details or "invalid request")
    return DecodeRequestError(code.name if code is not None else "UNKNOWN", details, _failed_pool(e))


class GenerateStream:
    """Iterator over one request's chunks; ``close()`` cancels it on the worker."""

    def __init__(self, call: grpc.Call, want_logprobs: bool) -> None:
        self._call = call
        self._lp = want_logprobs
        self._closed = False

    def __iter__(self) -> Iterator[TokenChunk]:
        try:
            for msg in self._call:
                yield chunk_from_proto(msg, self._lp)
        except grpc.RpcError as e:
            if self._closed and e.code() == grpc.StatusCode.CANCELLED:
                return
            raise error_from_rpc(e) from None

    def close(self) -> None:
        self._closed = True
        self._call.cancel()


class DecodeClient:
    def __init__(self, address: str, token: str = "", tls: GrpcTls | None = None) -> None:
        self.address = address
        self._channel = token_channel(address, token, tls)
        self._stub = pb_grpc.DecodeWorkerStub(self._channel)

    def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams, *,
        prefill: PrefillTarget | None = None, timeout_s: float = 0.0, rpc_timeout: float | None = None,
    ) -> GenerateStream:
        """``timeout_s``: the worker's deadline for the request; ``rpc_timeout``: the gRPC deadline
        (the call is cancelled when it passes, which the worker treats as a client gone)."""
        req = generate_request_to_proto(request_id, prompt_token_ids, params, prefill, timeout_s)
        return GenerateStream(self._stub.Generate(req, timeout=rpc_timeout), params.logprobs is not None)

    def abort(self, request_id: str, timeout: float = 10.0) -> bool:
        try:
            return self._stub.Abort(pb.AbortRequest(request_id=request_id), timeout=timeout).found
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    def status(self, timeout: float = 5.0) -> pb.WorkerStatus:
        try:
            return self._stub.Status(pb.StatusRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> DecodeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncDecodeClient:
    """The same API on grpc.aio, for the router's event loop (create it on the loop that uses it:
    a grpc.aio channel belongs to one loop). The router keeps one per decode address for its
    lifetime; the channel reconnects by itself, so a worker restarted on the address just works."""

    def __init__(self, address: str, token: str = "", tls: GrpcTls | None = None) -> None:
        self.address = address
        self._md = token_metadata(token)
        self._channel = open_aio_channel(address, tls)
        self._stub = pb_grpc.DecodeWorkerStub(self._channel)

    async def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams, *,
        prefill: PrefillTarget | None = None, timeout_s: float = 0.0, rpc_timeout: float | None = None,
    ) -> AsyncIterator[TokenChunk]:
        req = generate_request_to_proto(request_id, prompt_token_ids, params, prefill, timeout_s)
        call = self._stub.Generate(req, timeout=rpc_timeout, metadata=self._md)
        try:
            async for msg in call:
                yield chunk_from_proto(msg, params.logprobs is not None)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        finally:
            call.cancel()  # no-op when it finished; otherwise the worker aborts and frees

    async def abort(self, request_id: str, timeout: float = 10.0) -> bool:
        try:
            reply = await self._stub.Abort(
                pb.AbortRequest(request_id=request_id), timeout=timeout, metadata=self._md
            )
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        return reply.found

    async def status(self, timeout: float = 5.0) -> pb.WorkerStatus:
        try:
            return await self._stub.Status(pb.StatusRequest(), timeout=timeout, metadata=self._md)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    async def close(self) -> None:
        await self._channel.close()
