"""`DecodeClient` / `AsyncDecodeClient`: the router's (and tests') handle on one decode worker.

``generate`` streams `GenerateChunk`s. Leaving the stream early (``close()``, ``break`` out of
an ``async for``, a deadline) cancels the RPC, and the worker then aborts the request and
frees its blocks on both sides. Failures arrive as `DecodeRequestError` carrying the gRPC
status name; a rejected input raises the engine's `InvalidRequestError` (an HTTP 400 upstream).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc

from engine.errors import InvalidRequestError, SplitserveError
from engine.sampling_params import SamplingParams
from protocol.grpc_auth import CHANNEL_OPTIONS, token_channel, token_metadata
from protocol.proto import worker_pb2 as pb
from protocol.proto import worker_pb2_grpc as pb_grpc
from protocol.stream import PrefillTarget, TokenLogprob
from protocol.wire import params_to_proto


class DecodeRequestError(SplitserveError):
    """A generate call failed on the worker side or in transit; ``code`` is a grpc status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class GenerateChunk:
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    stop_reason: str | None
    prompt_tokens: int
    cached_tokens: int
    prefill_worker: str

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def build_request(
    request_id: str, prompt_token_ids: list[int], params: SamplingParams,
    prefill: PrefillTarget | None = None, timeout_s: float = 0.0,
) -> pb.GenerateRequest:
    req = pb.GenerateRequest(
        request_id=request_id, prompt_token_ids=prompt_token_ids, params=params_to_proto(params),
        timeout_s=timeout_s,
    )
    if prefill is not None:
        req.prefill.CopyFrom(pb.PrefillTarget(worker_id=prefill.worker_id, address=prefill.address))
    return req


def chunk_from_proto(msg: pb.GenerateResponse, want_logprobs: bool) -> GenerateChunk:
    lps = None
    if want_logprobs:
        lps = [TokenLogprob(lp.logprob, {t.token_id: t.logprob for t in lp.top}) for lp in msg.logprobs]
    return GenerateChunk(
        msg.index, list(msg.token_ids), msg.text, lps, msg.finish_reason or None, msg.stop_reason or None,
        msg.prompt_tokens, msg.cached_tokens, msg.prefill_worker,
    )


def error_from_rpc(e: grpc.RpcError) -> Exception:
    code = e.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(e.details() or "invalid request")
    return DecodeRequestError(code.name if code is not None else "UNKNOWN", e.details() or "")


class GenerateStream:
    """Iterator over one request's chunks; ``close()`` cancels it on the worker."""

    def __init__(self, call: grpc.Call, want_logprobs: bool) -> None:
        self._call = call
        self._lp = want_logprobs
        self._closed = False

    def __iter__(self) -> Iterator[GenerateChunk]:
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
    def __init__(self, address: str, token: str = "") -> None:
        self.address = address
        self._channel = token_channel(address, token)
        self._stub = pb_grpc.DecodeWorkerStub(self._channel)

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
        prefill: PrefillTarget | None = None, timeout_s: float = 0.0, rpc_timeout: float | None = None,
    ) -> GenerateStream:
        """``timeout_s``: the worker's deadline for the request; ``rpc_timeout``: the gRPC deadline
        (the call is cancelled when it passes, which the worker treats as a client gone)."""
        req = build_request(request_id, prompt_token_ids, params, prefill, timeout_s)
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
    """The same API on grpc.aio, for the router's event loop."""

    def __init__(self, address: str, token: str = "") -> None:
        self.address = address
        self._md = token_metadata(token)
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.DecodeWorkerStub(self._channel)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
        prefill: PrefillTarget | None = None, timeout_s: float = 0.0, rpc_timeout: float | None = None,
    ) -> AsyncIterator[GenerateChunk]:
        req = build_request(request_id, prompt_token_ids, params, prefill, timeout_s)
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
