"""`LLMEngine`: requests in, `RequestOutput`s out, one ``step()`` at a time.

The step is the three-line loop: schedule -> execute -> update. Workers reuse the same pieces
(`Scheduler`, `ModelRunner`, `OutputProcessor`) but drive them around their own transport.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig
from engine.errors import InvalidRequestError, ModelNotFoundError, PromptTooLongError
from engine.kv_cache_pool import KVCachePool, KVLayout
from engine.model_loader import load_model
from engine.model_runner import ModelRunner, StepResult
from engine.output_processor import OutputProcessor, RequestState
from engine.outputs import RequestOutput
from engine.parallel import ParallelGroup
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus
from engine.tokenizer import Tokenizer, load_tokenizer

PromptInput = str | list[int] | list[dict[str, str]]


@dataclass(frozen=True)
class RemotePrefill:
    """Where a prefill worker must write a prompt's KV on this (decode) worker."""

    seq_id: str
    block_ids: list[int]
    num_cached_tokens: int  # leading tokens decode already holds (whole blocks): not sent


class LLMEngine:
    def __init__(self, cfg: EngineConfig, tokenizer: Tokenizer | None = None) -> None:
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.model_config, self.model = load_model(
            cfg.model, cfg.dtype, cfg.device, group=ParallelGroup.from_config(cfg.parallel),
            max_positions=cfg.scheduler.max_model_len,
            random_weights=cfg.random_weights, seed=cfg.seed,
        )
        self.tokenizer = tokenizer if tokenizer is not None else _try_tokenizer(cfg.model)
        eos = tuple(self.model_config.eos_token_ids) or (
            tuple(self.tokenizer.eos_token_ids) if self.tokenizer is not None else ()
        )
        self.eos_token_ids = eos
        self.layout = KVLayout.for_budget(self.model_config, cfg.cache, cfg.dtype)
        self.pool = KVCachePool(self.layout, cfg.device)
        self.blocks = BlockManager(
            self.layout.num_blocks, self.layout.block_size,
            enable_prefix_caching=cfg.cache.enable_prefix_caching, watermark=cfg.cache.watermark,
        )
        self.scheduler = Scheduler(cfg.scheduler, self.blocks)
        self.runner = ModelRunner(
            self.model, self.pool, eos, seed=cfg.seed, exact_attention=cfg.exact_attention
        )
        self.outputs = OutputProcessor(self.tokenizer, eos, cfg.scheduler.max_model_len)
        self._seqs: dict[str, Sequence] = {}

    @property
    def max_model_len(self) -> int:
        return self.cfg.scheduler.max_model_len

    # ---- requests ---------------------------------------------------------------------------

    def tokenize(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        """A string, chat messages or token ids -> (prompt text, token ids)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("prompt: text prompts need a tokenizer; pass token ids")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            if self.tokenizer is None:
                raise InvalidRequestError("prompt: chat messages need a tokenizer")
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
            return text, self.tokenizer.encode(text, add_special_tokens=False)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise InvalidRequestError(f"prompt: token id {bad[0]} outside the vocabulary")
            return None, list(prompt)
        raise InvalidRequestError("prompt: expected a string, a list of chat messages, or a list of token ids")

    def validate_prompt(self, token_ids: Seq[int]) -> None:
        n = len(token_ids)
        if n == 0:
            raise InvalidRequestError("prompt: is empty")
        if n >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt: {n} tokens leave no room to generate within max_model_len={self.max_model_len}"
            )
        capacity = self.layout.num_blocks * self.layout.block_size
        if n + 1 > capacity:
            raise PromptTooLongError(f"prompt: {n} tokens exceed the KV cache capacity of {capacity} tokens")

    def add_request(self, request_id: str, prompt: PromptInput, params: SamplingParams) -> None:
        if request_id in self.outputs.requests:
            raise InvalidRequestError(f"request_id: {request_id!r} is already running")
        text, ids = self.tokenize(prompt)
        self.validate_prompt(ids)
        seqs = []
        for i in range(params.n):
            p = params if params.n == 1 else params.for_child(i)
            seq = Sequence(f"{request_id}-{i}", request_id, list(ids), p)
            seqs.append(seq)
            self._seqs[seq.seq_id] = seq
            self.scheduler.add(seq)
        self.outputs.add(RequestState(request_id, text, list(ids), params, seqs))

    # ---- disaggregation: the decode side of a remote prefill --------------------------------

    def add_remote_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> RemotePrefill:
        """Allocate the prompt's blocks (own prefix-cache hits reused) for a prefill worker to fill.

        Raises `OutOfBlocksError` (nothing held) when the pool cannot take the prompt now.
        """
        if params.n != 1:
            raise InvalidRequestError("n: remote prefill serves one sequence; run n > 1 locally")
        if request_id in self.outputs.requests:
            raise InvalidRequestError(f"request_id: {request_id!r} is already running")
        self.validate_prompt(prompt_ids)
        seq = Sequence(f"{request_id}-0", request_id, list(prompt_ids), params)
        cached = self.blocks.allocate(seq.seq_id, seq.prompt_token_ids)
        seq.status = SequenceStatus.REMOTE_PREFILL
        seq.num_cached_tokens = cached
        self._seqs[seq.seq_id] = seq
        self.outputs.add(RequestState(request_id, None, list(prompt_ids), params, [seq]))
        return RemotePrefill(seq.seq_id, list(self.blocks.block_table(seq.seq_id)), cached)

    def complete_remote_request(
        self, request_id: str, first_token: int, logprob: float = 0.0, top: dict[int, float] | None = None
    ) -> RequestOutput | None:
        """The prompt's KV has landed: join the running batch with the prefill's first token."""
        state = self.outputs.requests.get(request_id)
        if state is None or state.seqs[0].status is not SequenceStatus.REMOTE_PREFILL:
            return None  # aborted meanwhile; its blocks are already free
        seq = state.seqs[0]
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.output_token_ids.append(first_token)
        if seq.params.logprobs is not None:
            seq.logprobs.append(logprob)
            seq.top_logprobs.append(dict(top or {}))
        self.scheduler.add_prefilled(seq)
        stop = self.outputs.check_stop(seq, state.texts[0])
        finished = {seq.seq_id: stop} if stop is not None else {}
        out = self.outputs.make_output(state, finished)
        if stop is not None:
            self.scheduler.finish(seq, stop[0])
            self._forget(request_id)
        return out

    def abort_request(self, request_id: str) -> None:
        state = self.outputs.requests.pop(request_id, None)
        if state is None:
            return
        for seq in state.seqs:
            self.scheduler.finish(seq, "abort")
            self._seqs.pop(seq.seq_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.outputs.requests)

    # ---- one step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        result = self.runner.execute(sched.scheduled, [self.blocks.block_table(s.seq.seq_id) for s in sched.scheduled])
        return self.update(sched, result)

    def update(self, sched: SchedulerOutput, result: StepResult) -> list[RequestOutput]:
        """Apply sampled tokens, run stop checks, free finished sequences, emit outputs."""
        self.scheduler.update_from_output(sched, result.tokens())
        _record_logprobs(self._seqs, result)
        changed: dict[str, dict[str, tuple[str, str | int | None]]] = {}
        for seq_id in result.seq_ids:
            seq = self._seqs[seq_id]
            state = self.outputs.requests[seq.request_id]
            st = state.texts[state.seqs.index(seq)]
            stop = self.outputs.check_stop(seq, st)
            finished = changed.setdefault(seq.request_id, {})
            if stop is not None:
                finished[seq_id] = stop
        results = []
        for request_id, finished in changed.items():
            state = self.outputs.requests[request_id]
            out = self.outputs.make_output(state, finished)
            for seq in state.seqs:
                if seq.seq_id in finished:
                    self.scheduler.finish(seq, finished[seq.seq_id][0])
            if all(s.is_finished for s in state.seqs):
                self._forget(request_id)
            results.append(out)
        return results

    def _forget(self, request_id: str) -> None:
        state = self.outputs.requests.pop(request_id)
        for seq in state.seqs:
            self._seqs.pop(seq.seq_id, None)


def _record_logprobs(seqs: dict[str, Sequence], result: StepResult) -> None:
    out = result.output
    if out is None:
        return
    for row, seq_id in enumerate(result.seq_ids):
        seq = seqs[seq_id]
        if seq.params.logprobs is None:
            continue
        seq.logprobs.append(float(out.logprobs[row]))
        top: dict[int, float] = {}
        if out.top_ids is not None and out.top_logprobs is not None and seq.params.logprobs > 0:
            n = seq.params.logprobs
            top = dict(zip(out.top_ids[row, :n].tolist(), out.top_logprobs[row, :n].tolist()))
        seq.top_logprobs.append(top)


def _try_tokenizer(model: str) -> Tokenizer | None:
    """A random-weights run may have only config.json; a broken tokenizer file still raises."""
    try:
        return load_tokenizer(Path(model))
    except ModelNotFoundError:
        return None


__all__ = ["LLMEngine", "ModelConfig", "PromptInput"]
