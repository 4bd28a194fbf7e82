"""The narrow interface between the HTTP layer and whatever generates tokens.

The router validates, templates, tokenizes and routes; a `GenerationBackend` takes one routed
request and streams `TokenDelta`s. The production backend is the gRPC client to the decode
workers (which pull the prompt's KV from the chosen prefill worker); tests plug in a scripted
one. Keeping this interface small is what lets the two be swapped without touching HTTP code.

Contract:

- `generate` is an async generator. The router iterates it to the end or stops early; it
  always calls ``aclose()`` when it stops early (client disconnect, timeout, error in a sibling
  choice), and the backend must then cancel the request on every worker and free its blocks,
  typically in a ``finally`` block around its stream.
- Text in a delta is final: stop strings are applied by the engine, which holds back text that
  might start one. Token ids are every sampled id (the router counts usage from them).
- Before it yields anything the backend may raise `router.errors.QueueFullError` (→ 429),
  `PrefillFailedError` (→ router retries on another prefill worker or on decode),
  `WorkerUnavailableError` (→ router retries on another decode worker), or an
  `engine.errors.InvalidRequestError` (→ 400). After the first delta, `WorkerLostError` makes
  the router migrate the request (it resubmits it with ``resumed_output_tokens``); other
  errors end the stream.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from engine.sampling_params import SamplingParams
from protocol.stream import TokenLogprob


class Tokenizer(Protocol):
    """What the router needs from `engine.tokenizer.Tokenizer`."""

    @property
    def eos_token_ids(self) -> Sequence[int]: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str: ...


@dataclass(frozen=True)
class GenerateRequest:
    """One routed generation: one sequence (the router fans out ``n`` itself)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    decode_worker_id: str | None  # None: no registry (single-process backend picks)
    prefill_worker_id: str | None = None  # None: the decode worker prefills locally
    # what the router's prefix index expects each chosen worker to have cached (a hint)
    expected_cached_tokens: int = 0
    deadline: float | None = None  # time.monotonic() by which the request must finish


@dataclass(frozen=True)
class TokenDelta:
    """What one step added to a sequence: the router's side of the decode stream's `TokenChunk`.

    It keeps only what the HTTP layer renders, so a scripted backend has little to fill in.
    ``finish_reason`` is set on the last delta only: ``"stop"`` (EOS, stop token or string),
    ``"length"`` (max_tokens or max_model_len) or ``"abort"``. ``logprobs`` has one entry per
    id in ``token_ids``, in order, when the request asked for logprobs (the stream's own
    `TokenLogprob`). ``cached_tokens`` (first delta only, optional) is how many prompt tokens
    came from a prefix cache.
    """

    token_ids: list[int]
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    cached_tokens: int | None = None

    def token_logprobs(self) -> list[tuple[int, TokenLogprob]]:
        """Each sampled id with its logprob (empty when none were asked for)."""
        return list(zip(self.token_ids, self.logprobs or ()))


class GenerationBackend(abc.ABC):
    """Streams tokens for routed requests; see the module docstring for the contract."""

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Tokenizer:
        """The served model's tokenizer (chat template, counting, logprob token strings)."""

    @abc.abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """An async generator of deltas for one sequence (implement with ``async def ... yield``)."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections; called once when the app starts serving."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; called once at shutdown."""

    async def healthy(self) -> bool:
        """Whether requests can be served now (drives ``/health``)."""
        return True
