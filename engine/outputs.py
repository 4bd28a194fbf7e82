"""What `LLM.generate` and `LLMEngine.step` return (vLLM's RequestOutput shape)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    # per generated token: logprob of the chosen token, and the top-N alternatives
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    # what this step added (for streaming)
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestError:
    """Why a request ended without finishing (a remote prefill failed...): ``code`` is the gRPC
    status name a worker reports it with."""

    code: str
    message: str


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    error: RequestError | None = None  # set on the final output of a request that failed

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[float] | None:
        return self.outputs[0].logprobs


@dataclass(frozen=True)
class EngineStats:
    """A worker's ``Status`` view of its engine, taken between steps."""

    num_total_blocks: int
    num_free_blocks: int
    num_running: int
    num_waiting: int  # for a local prefill, or (remote prompts) for blocks
    num_remote_prefilling: int  # blocks allocated, a peer is filling them
    num_held: int  # finished, blocks kept until the peer confirms it stopped writing
    num_preemptions: int
    prefix_hit_tokens: int  # prompt tokens served from the prefix cache, ever
    queued_prompt_tokens: int  # prompt tokens of unfinished local sequences not computed yet

    @property
    def idle(self) -> bool:
        return not (self.num_running or self.num_waiting or self.num_remote_prefilling or self.num_held)
