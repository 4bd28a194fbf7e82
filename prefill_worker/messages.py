"""Typed messages between the prefill worker's gRPC/lease threads and its engine thread."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

from engine.sampling_params import SamplingParams
from worker_runtime.engine_loop import StopMsg


@dataclass(frozen=True)
class PrefillJob:
    """A decode worker's remote-prefill request, validated and handshaken."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    peer: str  # the decode worker's transport peer name
    decode_address: str  # its gRPC address (lease renewals)
    dst_blocks: list[int]  # decode's blocks for the whole prompt, in order
    skip_blocks: int  # leading blocks decode already holds: never written
    lease_s: float


@dataclass(frozen=True)
class Handshake:
    """First contact with a decode agent: the transport (driven by the engine thread only)
    adds it as a peer; ``done`` resolves to "" or the reason it was refused."""

    agent: str
    metadata: bytes
    done: Future[str]


@dataclass(frozen=True)
class AbortJob:
    """Drop a job; ``done`` resolves (found?) once no write of it is in flight."""

    request_id: str
    done: Future[bool] | None = None


InboxMsg = PrefillJob | Handshake | AbortJob | StopMsg
