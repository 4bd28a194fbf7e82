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
from protocol.stream import PrefillTarget, StreamError, StreamEvent, TokenChunk, TokenLogprob
from worker_runtime.engine_loop import StopMsg

# ---- into the engine thread -------------------------------------------------------------------


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


InboxMsg = NewRequest | AbortMsg | PrefillReply | PeerAbortDone | StopMsg

__all__ = [
    "AbortMsg", "InboxMsg", "NewRequest", "PeerAbortDone", "PrefillReply", "PrefillTarget", "StopMsg",
    "StreamError", "StreamEvent", "TokenChunk", "TokenLogprob",
]
