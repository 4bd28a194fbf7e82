"""`Sequence`: one generation stream (a request has ``n`` of them) and its progress."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams

_arrival = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"  # a peer computes the prompt; no blocks yet
    REMOTE_PREFILL = "remote_prefill"  # blocks allocated, a prefill worker is filling them
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """Token state of one stream.

    ``num_computed_tokens`` counts tokens whose KV is in this worker's cache. A sequence is in
    prefill while it is below ``num_prompt_tokens`` (chunked prefill advances it in chunks) and
    in decode after; preemption by recompute resets it to 0.
    """

    seq_id: str
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at last allocation
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    arrival: int = field(default_factory=lambda: next(_arrival))
    # logprob of each output token and its top-N alternatives (when params.logprobs is set)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        return self.num_computed_tokens < self.num_tokens - 1 or not self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        n = self.num_prompt_tokens
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:  # decode: a slice of the outputs, never a copy of the whole sequence
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]
