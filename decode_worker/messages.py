"""Typed messages between the decode worker's gRPC threads and its engine thread.

The engine thread owns the `LLMEngine`; everyone else talks to it through `DecodeLoop.inbox`
(requests in) and one `queue.Queue` per request (stream events out). Nothing else is shared,
so the engine needs no locks.
"""

from __future__ import annotations

import queue
from concurrent.futures import Future
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams

# ---- into the engine thread -------------------------------------------------------------------


@dataclass(frozen=True)
class PrefillTarget:
    worker_id: str
    address: str  # host:port of the prefill worker's gRPC server


@dataclass
class NewRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prefill: PrefillTarget | None  # None: decode runs the prompt itself
    deadline: float | None  # time.monotonic() by which it must finish; None: no limit
    stream: queue.Queue[StreamEvent] = field(default_factory=queue.Queue)


@dataclass(frozen=True)
class AbortMsg:
    request_id: str
    reason: str  # "client gone", "abort rpc", ...
    found: Future[bool] | None = None  # set by the engine thread: was the request live?


@dataclass(frozen=True)
class PrefillReply:
    """The prefill worker's answer to our RemotePrefill call, or the call's failure."""

    transfer_id: str
    accepted: bool
    refused: bool = False  # the worker answered no (vs. the call failed: it may have run)
    error: str = ""
    code: str = ""  # grpc status name to fail the request with when not accepted
    agent_name: str = ""


@dataclass(frozen=True)
class PeerAbortDone:
    """The prefill worker confirmed it stopped writing (or is unreachable): blocks are ours again."""

    transfer_id: str


@dataclass(frozen=True)
class StopMsg:
    pass


InboxMsg = NewRequest | AbortMsg | PrefillReply | PeerAbortDone | StopMsg

# ---- out to a request's stream ----------------------------------------------------------------


@dataclass(frozen=True)
class TokenLogprob:
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
