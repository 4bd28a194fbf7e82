"""What a decode worker's stream carries, in the engine's terms: the contract between the
decode worker (producer), its gRPC servicer and every client of it (the router, the tests).

A token delta has three shapes on its way out, and only three: the engine's `RequestOutput`
inside the worker, `TokenChunk` here (the decode loop makes it; `protocol.wire` converts it to
and from ``GenerateResponse``, once each way; `protocol.decode_client` yields it) and the
router's `TokenDelta`, which adds nothing but the router's first-delta bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrefillTarget:
    worker_id: str
    address: str  # host:port of the prefill worker's gRPC server


@dataclass(frozen=True)
class TokenLogprob:
    """Logprob of one sampled token and its top alternatives (token id -> logprob).

    It belongs to the token at the same position of its chunk's ``token_ids``, which is why it
    does not repeat the id. Logprobs cross the wire as float32.
    """

    logprob: float
    top: dict[int, float]


@dataclass(frozen=True)
class TokenChunk:
    """What one step added to the request (the engine's delta)."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # "stop" | "length" | "abort" on the last chunk
    stop_reason: str | None
    prompt_tokens: int
    cached_tokens: int
    prefill_worker: str  # "" when decode ran the prompt
    index: int = 0  # which of the request's n sequences


@dataclass(frozen=True)
class StreamError:
    """The request failed; ``code`` is a grpc status name (the engine thread does not import grpc)."""

    code: str
    message: str


StreamEvent = TokenChunk | StreamError
