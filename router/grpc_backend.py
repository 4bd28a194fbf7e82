"""`GrpcBackend`: the production `GenerationBackend`, streaming from decode workers over grpc.aio.

The router has already chosen the workers; this backend only resolves their ids to addresses
(from the router's `ClusterView`, which mirrors the Redis registry), opens one ``Generate``
stream on the decode worker (which itself asks the prefill worker, when one is named, to push
the prompt's KV), and turns gRPC outcomes into the errors of the backend contract, so the
dispatcher knows what to retry:

- before the first token, a failure on the prefill side is `PrefillFailedError` (the router
  re-routes to another prefill worker or lets decode prefill), a failure of the decode worker
  itself is `WorkerUnavailableError`, a rejected input `InvalidRequestError` (400) and a full
  queue `QueueFullError` (429);
- after it, any failure ends the stream (the router reports it in-band).

Closing the generator cancels the call; the decode worker then aborts the request on both
sides and frees its blocks. One channel per decode address is kept for the process lifetime
(channels reconnect by themselves, so a restarted worker on the same address just works).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from engine.errors import InvalidRequestError
from protocol.grpc_auth import CHANNEL_OPTIONS, token_metadata
from protocol.proto import worker_pb2 as pb
from protocol.proto import worker_pb2_grpc as pb_grpc
from protocol.registry import WorkerInfo
from protocol.wire import params_to_proto
from router.backend import GenerateRequest, GenerationBackend, TokenDelta, Tokenizer, TokenLogprob
from router.errors import (
    PrefillFailedError,
    QueueFullError,
    RequestTimeoutError,
    ServiceUnavailableError,
    WorkerUnavailableError,
)

log = logging.getLogger(__name__)

FAILED_POOL_HEADER = "x-splitserve-failed-pool"
"""Trailing metadata a decode worker may set ("prefill" / "decode") to say whose failure it was."""

# status codes under which a decode worker reports that the prefill side failed (the message says so)
_PREFILL_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED,
})  # fmt: skip

_INT32_PARAMS = ("n", "top_k", "max_tokens", "min_tokens", "logprobs")  # int32 on the wire

WorkerLookup = Callable[[str], WorkerInfo | None]


class GrpcBackend(GenerationBackend):
    """Streams tokens from decode workers; ``lookup`` maps a worker id to its registry record."""

    def __init__(
        self, tokenizer: Tokenizer, token: str = "", lookup: WorkerLookup | None = None,
        rpc_slack_s: float = 5.0,
    ) -> None:
        self._tokenizer = tokenizer
        self._md = token_metadata(token)
        self._lookup = lookup
        self._rpc_slack_s = rpc_slack_s  # the worker's own deadline fires first; the RPC's is a backstop
        self._channels: dict[str, tuple[grpc.aio.Channel, pb_grpc.DecodeWorkerStub]] = {}

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def set_lookup(self, lookup: WorkerLookup) -> None:
        """Bind to the router's view of the cluster (known only once the app is built)."""
        self._lookup = lookup

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel, _ in channels.values():
            await channel.close()

    def _stub(self, address: str) -> pb_grpc.DecodeWorkerStub:
        # created lazily, on the event loop that uses it (grpc.aio channels belong to one loop)
        entry = self._channels.get(address)
        if entry is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            entry = self._channels[address] = (channel, pb_grpc.DecodeWorkerStub(channel))
        return entry[1]

    def _resolve(self, worker_id: str | None) -> WorkerInfo | None:
        if worker_id is None or self._lookup is None:
            return None
        return self._lookup(worker_id)

    def _build(self, request: GenerateRequest) -> tuple[pb.GenerateRequest, float | None]:
        params = request.sampling_params
        for name in _INT32_PARAMS:
            value = getattr(params, name)
            if value is not None and not -(2**31) <= value < 2**31:
                raise InvalidRequestError(f"{name}: must fit in 32 bits, got {value}")
        try:
            msg = pb.GenerateRequest(
                request_id=request.request_id,
                prompt_token_ids=request.prompt_token_ids,
                params=params_to_proto(params),
            )
        except (ValueError, TypeError) as e:  # a value the wire's int32 fields cannot carry
            raise InvalidRequestError(f"a sampling parameter is out of range: {e}") from None
        if request.prefill_worker_id is not None:
            prefill = self._resolve(request.prefill_worker_id)
            if prefill is None:
                raise PrefillFailedError(request.prefill_worker_id, "prefill worker is no longer registered")
            msg.prefill.CopyFrom(pb.PrefillTarget(worker_id=prefill.worker_id, address=prefill.address))
        rpc_timeout = None
        if request.deadline is not None:
            left = request.deadline - time.monotonic()
            if left <= 0:
                raise RequestTimeoutError("request timed out before it was sent to a worker")
            msg.timeout_s = left
            rpc_timeout = left + self._rpc_slack_s
        return msg, rpc_timeout

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        decode_id = request.decode_worker_id
        if decode_id is None:
            raise WorkerUnavailableError("?", "no decode worker was chosen (the router has no registry)")
        decode = self._resolve(decode_id)
        if decode is None:
            raise WorkerUnavailableError(decode_id, f"decode worker {decode_id} is no longer registered")
        msg, rpc_timeout = self._build(request)
        want_logprobs = request.sampling_params.logprobs is not None
        call = self._stub(decode.address).Generate(msg, timeout=rpc_timeout, metadata=self._md)
        started = False
        try:
            async for resp in call:
                delta = _delta(resp, want_logprobs, first=not started)
                if delta is None:
                    continue
                started = True
                yield delta
        except grpc.aio.AioRpcError as e:
            raise _map_error(e, request, started) from None
        finally:
            call.cancel()  # no-op once finished; otherwise the worker aborts and frees the blocks


def _delta(resp: pb.GenerateResponse, want_logprobs: bool, first: bool) -> TokenDelta | None:
    ids = list(resp.token_ids)
    finish = resp.finish_reason or None
    if not ids and finish is None and not resp.text:
        return None
    lps = None
    if want_logprobs and len(resp.logprobs) == len(ids):
        lps = [
            TokenLogprob(tid, lp.logprob, {t.token_id: t.logprob for t in lp.top})
            for tid, lp in zip(ids, resp.logprobs)
        ]
    return TokenDelta(ids, resp.text, lps, finish, resp.cached_tokens if first else None)


def _failed_pool(e: grpc.aio.AioRpcError) -> str | None:
    for key, value in e.trailing_metadata() or ():
        if key == FAILED_POOL_HEADER:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def _map_error(e: grpc.aio.AioRpcError, request: GenerateRequest, started: bool) -> Exception:
    code, details = e.code(), e.details() or ""
    decode_id = request.decode_worker_id or "?"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(details or "invalid request")
    if started:  # after the first token nothing is retried: end the stream with the reason
        return ServiceUnavailableError(f"generation failed on decode worker {decode_id}: {details}")
    pool = _failed_pool(e)
    prefill_id = request.prefill_worker_id
    if prefill_id is not None and (
        pool == "prefill" or (pool is None and code in _PREFILL_CODES and "prefill" in details.lower())
    ):
        return PrefillFailedError(prefill_id, f"prefill worker {prefill_id} failed: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return QueueFullError(f"decode worker {decode_id} is full: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RequestTimeoutError("request timed out")
    log.warning("decode worker %s failed a request: %s %s", decode_id, code.name, details)
    return WorkerUnavailableError(decode_id, f"decode worker {decode_id}: {code.name}: {details}")
