"""`LLMEngine`: requests in, `RequestOutput`s out, one ``step()`` at a time.

The step is: connector poll -> schedule -> (connector start) -> forward with the connector's
layer hook -> sample -> (connector end of step) -> update -> outputs. Workers drive the same
step and plug their KV transport in as a `KVConnector` (see `engine.kv_connector`); without
one it is the offline engine.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence as Seq
from pathlib import Path

import torch

from engine.async_step import InFlightStep, overlap_safe, place_holders
from engine.block_manager import BlockManager, KVEvent
from engine.config import CacheConfig, EngineConfig, ModelConfig
from engine.distributed.rank_setup import load_rank_model, rank_kv_layout
from engine.distributed.runner import make_runner
from engine.errors import InvalidRequestError, ModelNotFoundError, PromptTooLongError, RequestStepError
from engine.kv_budget import StepShape, device_kv_bytes
from engine.kv_cache_pool import KVCachePool
from engine.kv_connector import KVArrival, KVConnector, KVFailure, KVPoll, KVStepOutcome
from engine.model_runner import StepResult
from engine.output_processor import OutputProcessor, RequestState
from engine.outputs import EngineStats, RequestError, RequestOutput
from engine.resume import replay_resumed_text, split_resumed
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus
from engine.tokenizer import Tokenizer, load_tokenizer

PromptInput = str | list[int] | list[dict[str, str]]
log = logging.getLogger("splitserve.engine")


class LLMEngine:
    def __init__(
        self, cfg: EngineConfig, tokenizer: Tokenizer | None = None, kv_connector: KVConnector | None = None
    ) -> None:
        self.cfg = cfg
        self.kv_connector = kv_connector
        torch.manual_seed(cfg.seed)
        self.model_config, self.model = load_rank_model(cfg)  # this rank's shard (engine.distributed)
        self.tokenizer = tokenizer if tokenizer is not None else _try_tokenizer(cfg.model)
        eos = tuple(self.model_config.eos_token_ids) or (
            tuple(self.tokenizer.eos_token_ids) if self.tokenizer is not None else ()
        )
        self.eos_token_ids = eos
        self.layout = rank_kv_layout(self.model_config, cfg, self._kv_cache_config())
        self.pool = KVCachePool(self.layout, cfg.device)
        self.blocks = BlockManager(
            self.layout.num_blocks, self.layout.block_size,
            enable_prefix_caching=cfg.cache.enable_prefix_caching, watermark=cfg.cache.watermark,
        )
        self.scheduler = Scheduler(cfg.scheduler, self.blocks)
        self.runner = make_runner(self.model, self.pool, eos, cfg)
        self.runner.capture_graphs()
        self.outputs = OutputProcessor(self.tokenizer, eos, cfg.scheduler.max_model_len)
        self._seqs: dict[str, Sequence] = {}
        self._kv_params: dict[str, object] = {}  # remote prompts waiting for blocks -> connector's params
        self._step_requests: frozenset[str] = frozenset()  # what the last step scheduled
        self._inflight: InFlightStep | None = None  # a decode step whose tokens are not read yet

    def _kv_cache_config(self) -> CacheConfig:
        """The cache config with ``memory_bytes`` measured from free GPU memory when
        ``gpu_memory_utilization`` asks for it (after the weights are loaded: now)."""
        cfg = self.cfg
        u = cfg.gpu_memory_utilization
        # a worker group's ranks must agree on one block count: they keep the configured bytes
        if (u is None or cfg.parallel.world_size > 1 or cfg.cache.num_blocks is not None
                or torch.device(cfg.device).type != "cuda"):
            return cfg.cache
        shape = StepShape(cfg.scheduler.max_num_batched_tokens, cfg.scheduler.max_num_seqs)
        kv = device_kv_bytes(torch.device(cfg.device), self.model_config, cfg.dtype, shape, u, cfg.cuda_graphs)
        log.info("KV cache: %.2f GiB (gpu_memory_utilization=%s)", kv / 2**30, u)
        return dataclasses.replace(cfg.cache, memory_bytes=kv)

    def attach_kv_connector(self, connector: KVConnector) -> None:
        """For a worker that builds its connector around an engine it was given (one per engine)."""
        if self.kv_connector is not None and self.kv_connector is not connector:
            raise ValueError("kv_connector: this engine already has one")
        if self.outputs.requests:
            raise ValueError("kv_connector: attach it before the first request")
        self.kv_connector = connector

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
        if not self.blocks.can_ever_allocate(n + 1):  # an idle pool, less its watermark: else it waits forever
            capacity = self.layout.num_blocks * self.layout.block_size
            raise PromptTooLongError(f"prompt: {n} tokens do not fit this worker's KV cache ({capacity} tokens)")

    def add_request(
        self, request_id: str, prompt: PromptInput, params: SamplingParams, kv_params: object = None
    ) -> None:
        """Queue a request; ``kv_params`` is what the KV connector needs to fetch its prompt's KV
        from a peer (a decode worker's prefill target), None for a request computed here."""
        if request_id in self.outputs.requests or request_id in self.scheduler.held:
            raise InvalidRequestError(f"request_id: {request_id!r} is already running")
        text, ids = self.tokenize(prompt)
        self.validate_prompt(ids)
        prompt_ids, resumed = split_resumed(ids, params)  # resumed: output a dead worker streamed
        if resumed and kv_params is not None:
            raise InvalidRequestError("resumed_output_tokens: a resumed request is prefilled where it decodes")
        remote = 0
        if self.kv_connector is not None:
            remote = self.kv_connector.num_remote_prompt_tokens(request_id, ids, kv_params)
        if remote:
            self._add_remote(request_id, ids, params, remote, kv_params)
            return
        seqs = []
        for i in range(params.n):
            p = params if params.n == 1 else params.for_child(i)
            seq = Sequence(f"{request_id}-{i}", request_id, list(prompt_ids), p, output_token_ids=list(resumed))
            seqs.append(seq)
            self._seqs[seq.seq_id] = seq
            self.scheduler.add(seq)
        state = RequestState(request_id, text, list(prompt_ids), params, seqs)
        self.outputs.add(state)
        if resumed:
            replay_resumed_text(state)

    def _add_remote(
        self, request_id: str, ids: list[int], params: SamplingParams, remote: int, kv_params: object
    ) -> None:
        if params.n != 1:
            raise InvalidRequestError("n: remote prefill serves one sequence; run n > 1 locally")
        if remote != len(ids):
            raise InvalidRequestError(f"prompt: a peer may compute all {len(ids)} tokens or none, not {remote}")
        seq = Sequence(f"{request_id}-0", request_id, list(ids), params)
        self._seqs[seq.seq_id] = seq
        self._kv_params[request_id] = kv_params
        self.scheduler.add_remote(seq)
        self.outputs.add(RequestState(request_id, None, list(ids), params, [seq]))

    def abort_request(self, request_id: str) -> None:
        state = self.outputs.requests.pop(request_id, None)
        if state is None:
            return
        hold = self._connector_finished(request_id)
        for seq in state.seqs:
            self.scheduler.finish(seq, "abort", hold=hold)
            self._seqs.pop(seq.seq_id, None)

    def fail_request(self, request_id: str, reason: str, code: str = "INTERNAL") -> RequestOutput | None:
        """End one request that a step could not serve (its blocks freed), leaving the others
        running; its final output carries the error. None when it is not running here."""
        return self._fail(KVFailure(request_id, RequestError(code, reason)))

    def failed_step_requests(self, error: BaseException) -> list[str]:
        """Which requests a step that raised ``error`` must fail: the one it names, else every
        request the step scheduled (never the others, never the worker)."""
        if isinstance(error, RequestStepError):
            return [error.request_id]
        return sorted(r for r in self._step_requests if r in self.outputs.requests)

    def has_unfinished_requests(self) -> bool:
        return bool(self.outputs.requests)

    def has_schedulable_requests(self) -> bool:
        """True while a step would run the model (remote prefills wait for their peer instead)
        or a step's tokens are still to be read."""
        return self.scheduler.has_unfinished() or self._inflight is not None

    # ---- what a worker reports ---------------------------------------------------------------

    @property
    def kv_cache_pool(self) -> KVCachePool:
        """The paged KV memory, for a KV transport to register once at start-up."""
        return self.pool

    def kv_blocks_for(self, num_tokens: int) -> int:
        return self.blocks.num_blocks_for(num_tokens)

    def stats(self) -> EngineStats:
        sched, blocks = self.scheduler, self.blocks
        return EngineStats(
            num_total_blocks=blocks.num_total_blocks,
            num_free_blocks=blocks.num_free_blocks,
            num_running=len(sched.running),
            num_waiting=len(sched.waiting) + len(sched.remote_waiting),
            num_remote_prefilling=len(sched.remote_prefilling),
            num_held=len(sched.held),
            num_preemptions=sched.num_preemptions,
            prefix_hit_tokens=blocks.num_hit_tokens,
            queued_prompt_tokens=sum(
                max(0, s.num_prompt_tokens - s.num_computed_tokens) for s in (*sched.waiting, *sched.running)
            ),
        )

    def check_integrity(self) -> None:
        """Raises `BlockIntegrityError` unless every block is accounted for (meaningful when idle)."""
        self.blocks.check_integrity()

    def drain_kv_events(self) -> list[KVEvent]:
        """Prefix-cache stores and removals since the last call, for the router's index."""
        return self.blocks.drain_events()

    # ---- one step ---------------------------------------------------------------------------

    def poll_kv(self) -> list[RequestOutput]:
        """What the KV connector delivered since the last poll: remote prompts that arrived (with
        their first token), failed, or whose held blocks were released. A worker that streams calls
        this before `step`, which polls too but returns its outputs only after running the batch:
        a first token would otherwise wait one whole decode step before reaching its client."""
        return self._apply_kv_poll() if self.kv_connector is not None else []

    def step(self) -> list[RequestOutput]:
        outputs = self.poll_kv()
        if self._inflight is not None and not overlap_safe(self.scheduler, self.blocks.num_free_blocks):
            outputs += self._finish_inflight()
        sched = self.scheduler.schedule()
        self._step_requests = frozenset(s.seq.request_id for s in sched.scheduled)
        if sched.is_empty:
            return outputs + (self._finish_inflight() if self._inflight is not None else [])
        tables = [self.blocks.block_table_view(s.seq.seq_id) for s in sched.scheduled]
        conn = self.kv_connector
        hook = conn.save_layer if conn is not None and conn.start_step(sched.scheduled, tables) else None
        try:
            fwd = self.runner.run(sched.scheduled, tables, on_layer_done=hook)
        finally:
            if conn is not None:
                conn.end_forward()
        pending = self.runner.sample_async(fwd)
        if self._inflight is not None:  # the previous step's outputs, while the GPU runs this one
            outputs += self._finish_inflight()
        if self.cfg.overlap_scheduling and fwd.decode_path:
            self._inflight = place_holders(self.scheduler, sched, pending)
            return outputs
        result = pending.wait()
        return outputs + self.update(sched, result, conn.end_step(sched.scheduled, result) if conn else None)

    def _finish_inflight(self) -> list[RequestOutput]:
        """Read the step in flight's tokens and run what `update` runs after the scheduler."""
        inflight, self._inflight = self._inflight, None
        assert inflight is not None
        result = inflight.resolve(self._seqs)
        conn = self.kv_connector
        kv = conn.end_step(inflight.sched.scheduled, result) if conn is not None else None
        return self._after_tokens(result, kv)

    def update(
        self, sched: SchedulerOutput, result: StepResult, kv: KVStepOutcome | None = None
    ) -> list[RequestOutput]:
        """Apply sampled tokens, run stop checks, free finished sequences, emit outputs."""
        self.scheduler.update_from_output(sched, result.tokens())
        return self._after_tokens(result, kv)

    def _after_tokens(self, result: StepResult, kv: KVStepOutcome | None) -> list[RequestOutput]:
        _record_logprobs(self._seqs, result)
        failed = {f.request_id: f for f in kv.failed} if kv is not None else {}
        delivered = kv.done if kv is not None else set()
        changed: dict[str, dict[str, tuple[str, str | int | None]]] = {}
        for seq_id in result.seq_ids:
            seq = self._seqs[seq_id]
            if seq.request_id in failed:
                continue
            state = self.outputs.requests[seq.request_id]
            st = state.texts[state.seqs.index(seq)]
            try:
                stop = ("prefilled", None) if seq.request_id in delivered else self.outputs.check_stop(seq, st)
            except Exception as e:  # this request's own text or stop check: it alone ends
                failed[seq.request_id] = KVFailure(seq.request_id, RequestError("INTERNAL", f"stop check failed: {e}"))
                changed.pop(seq.request_id, None)
                continue
            finished = changed.setdefault(seq.request_id, {})
            if stop is not None:
                finished[seq_id] = stop
        results = [out for f in failed.values() if (out := self._fail(f)) is not None]
        for request_id, finished in changed.items():
            state = self.outputs.requests[request_id]
            out = self.outputs.make_output(state, finished)
            done = all(s.is_finished or s.seq_id in finished for s in state.seqs)
            hold = self._connector_finished(request_id) if done else False
            for seq in state.seqs:
                if seq.seq_id in finished:
                    self.scheduler.finish(seq, finished[seq.seq_id][0], hold=hold)
            if done:
                self._forget(request_id)
            results.append(out)
        return results

    # ---- the KV connector's scheduler side ---------------------------------------------------

    def _apply_kv_poll(self) -> list[RequestOutput]:
        """Arrivals join the batch, failures end their requests, released blocks are freed;
        then prompts waiting for remote KV get blocks while the batch has room."""
        assert self.kv_connector is not None
        poll: KVPoll = self.kv_connector.poll()
        for request_id in poll.released:
            self.scheduler.release(request_id)
        outputs = [out for f in poll.failed if (out := self._fail(f)) is not None]
        outputs += [out for a in poll.arrived if (out := self._arrive(a)) is not None]
        for seq in self.scheduler.admit_remote():
            kv_params = self._kv_params.pop(seq.request_id, None)
            self.kv_connector.on_blocks_allocated(
                seq.request_id, kv_params, list(self.blocks.block_table(seq.seq_id)), seq.num_cached_tokens
            )
        return outputs

    def _arrive(self, a: KVArrival) -> RequestOutput | None:
        """The prompt's KV has landed: join the running batch with the prefill's first token."""
        state = self.outputs.requests.get(a.request_id)
        if state is None or state.seqs[0].status is not SequenceStatus.REMOTE_PREFILL:
            return None  # aborted meanwhile; the abort path owns its blocks
        seq = state.seqs[0]
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.num_cached_tokens = a.num_cached_tokens  # what the client sees: the peer's prefix hits
        seq.output_token_ids.append(a.first_token)
        if seq.params.logprobs is not None:
            seq.logprobs.append(a.logprob)
            seq.top_logprobs.append(dict(a.top))
        self.scheduler.add_prefilled(seq)
        stop = self.outputs.check_stop(seq, state.texts[0])
        finished = {seq.seq_id: stop} if stop is not None else {}
        out = self.outputs.make_output(state, finished)
        if stop is not None:
            hold = self._connector_finished(a.request_id)
            self.scheduler.finish(seq, stop[0], hold=hold)
            self._forget(a.request_id)
        return out

    def _fail(self, f: KVFailure) -> RequestOutput | None:
        """End a request the connector gave up on; its final output carries the error."""
        state = self.outputs.requests.get(f.request_id)
        if state is None:
            return None
        out = self.outputs.make_output(state, {s.seq_id: ("abort", None) for s in state.seqs if not s.is_finished})
        out.error = f.error
        self.abort_request(f.request_id)
        return out

    def _connector_finished(self, request_id: str) -> bool:
        self._kv_params.pop(request_id, None)
        return self.kv_connector.request_finished(request_id) if self.kv_connector is not None else False

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
