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
- after it, a lost worker (UNAVAILABLE: killed, or shutting down) is `WorkerLostError`, which
  the router answers by migrating the request (`router.migration`); any other failure ends
  the stream (the router reports it in-band).

The wire is `protocol.decode_client.AsyncDecodeClient`'s business (the same client the
data-plane tests use, converting through `protocol.wire`); this module only turns its
`TokenChunk`s into the router's `TokenDelta`s and its errors into the contract's. Closing the
generator cancels the call; the decode worker then aborts the request on both sides and frees
its blocks. One client per decode address is kept for the process lifetime.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable

from protocol.decode_client import AsyncDecodeClient, DecodeRequestError
from protocol.grpc_auth import GrpcTls
from protocol.registry import WorkerInfo
from protocol.stream import PrefillTarget, TokenChunk
from router.backend import GenerateRequest, GenerationBackend, TokenDelta, Tokenizer
from router.errors import (
    PrefillFailedError,
    QueueFullError,
    RequestTimeoutError,
    ServiceUnavailableError,
    WorkerLostError,
    WorkerUnavailableError,
)

log = logging.getLogger(__name__)

# status codes under which a decode worker reports that the prefill side failed (the message says so)
_PREFILL_CODES = frozenset(
    {"UNAVAILABLE", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "INTERNAL", "DEADLINE_EXCEEDED"}
)

# after the first token, what a dead or departing worker's stream ends with (kill -9: the
# connection breaks; a graceful stop: "shutting down"); other codes are the request's own failure
_LOST_CODES = frozenset({"UNAVAILABLE"})

WorkerLookup = Callable[[str], WorkerInfo | None]


class GrpcBackend(GenerationBackend):
    """Streams tokens from decode workers; ``lookup`` maps a worker id to its registry record."""

    def __init__(
        self, tokenizer: Tokenizer, token: str = "", lookup: WorkerLookup | None = None,
        rpc_slack_s: float = 5.0, tls: GrpcTls | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._tls = tls  # verify decode workers against its CA (None: plain gRPC)
        self._token = token
        self._lookup = lookup
        self._rpc_slack_s = rpc_slack_s  # the worker's own deadline fires first; the RPC's is a backstop
        self._clients: dict[str, AsyncDecodeClient] = {}

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def set_lookup(self, lookup: WorkerLookup) -> None:
        """Bind to the router's view of the cluster (known only once the app is built)."""
        self._lookup = lookup

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.close()

    def _client(self, address: str) -> AsyncDecodeClient:
        # created lazily, on the event loop that uses it (grpc.aio channels belong to one loop)
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = AsyncDecodeClient(address, self._token, self._tls)
        return client

    def _resolve(self, worker_id: str | None) -> WorkerInfo | None:
        if worker_id is None or self._lookup is None:
            return None
        return self._lookup(worker_id)

    def _prefill_target(self, request: GenerateRequest) -> PrefillTarget | None:
        if request.prefill_worker_id is None:
            return None
        prefill = self._resolve(request.prefill_worker_id)
        if prefill is None:
            raise PrefillFailedError(request.prefill_worker_id, "prefill worker is no longer registered")
        return PrefillTarget(prefill.worker_id, prefill.address)

    def _timeouts(self, request: GenerateRequest) -> tuple[float, float | None]:
        """(the worker's deadline for the request, the RPC's), 0 / None when there is none."""
        if request.deadline is None:
            return 0.0, None
        left = request.deadline - time.monotonic()
        if left <= 0:
            raise RequestTimeoutError("request timed out before it was sent to a worker")
        return left, left + self._rpc_slack_s

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        decode_id = request.decode_worker_id
        if decode_id is None:
            raise WorkerUnavailableError("?", "no decode worker was chosen (the router has no registry)")
        decode = self._resolve(decode_id)
        if decode is None:
            raise WorkerUnavailableError(decode_id, f"decode worker {decode_id} is no longer registered")
        prefill = self._prefill_target(request)
        timeout_s, rpc_timeout = self._timeouts(request)
        stream = self._client(decode.address).generate(
            request.request_id, request.prompt_token_ids, request.sampling_params,
            prefill=prefill, timeout_s=timeout_s, rpc_timeout=rpc_timeout,
        )
        started = False
        try:
            async for chunk in stream:
                delta = _delta(chunk, first=not started)
                if delta is None:
                    continue
                started = True
                yield delta
        except DecodeRequestError as e:
            if started and e.code in _LOST_CODES:  # the worker is gone, not the request: migrate it
                raise WorkerLostError(decode_id, decode.address, f"decode worker {decode_id}: {e.code}: "
                                      f"{e.message}") from None
            raise _map_error(e, request, started) from None
        finally:
            await stream.aclose()  # cancels the call unless it finished: the worker aborts and frees


def _delta(chunk: TokenChunk, first: bool) -> TokenDelta | None:
    if not chunk.token_ids and chunk.finish_reason is None and not chunk.text:
        return None
    lps = chunk.logprobs if chunk.logprobs is not None and len(chunk.logprobs) == len(chunk.token_ids) else None
    return TokenDelta(chunk.token_ids, chunk.text, lps, chunk.finish_reason, chunk.cached_tokens if first else None)


def _map_error(e: DecodeRequestError, request: GenerateRequest, started: bool) -> Exception:
    code, details = e.code, e.message
    decode_id = request.decode_worker_id or "?"
    if started:  # after the first token nothing is retried: end the stream with the reason
        return ServiceUnavailableError(f"generation failed on decode worker {decode_id}: {details}")
    pool = e.failed_pool
    prefill_id = request.prefill_worker_id
    if prefill_id is not None and (
        pool == "prefill" or (pool is None and code in _PREFILL_CODES and "prefill" in details.lower())
    ):
        return PrefillFailedError(prefill_id, f"prefill worker {prefill_id} failed: {details}")
    if code == "RESOURCE_EXHAUSTED":
        return QueueFullError(f"decode worker {decode_id} is full: {details}")
    if code == "DEADLINE_EXCEEDED":
        return RequestTimeoutError("request timed out")
    log.warning("decode worker %s failed a request: %s %s", decode_id, code, details)
    return WorkerUnavailableError(decode_id, f"decode worker {decode_id}: {code}: {details}")
