"""`LLM`: the offline API, vLLM-style, and the reference the disaggregated path must match."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from pathlib import Path

import torch
from tqdm import tqdm

from engine.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig, parse_dtype
from engine.distributed.followers import FollowerSet, rank_config
from engine.distributed.runner import GroupRunner
from engine.distributed.shapes import check_group_shape
from engine.distributed.world import GroupRankError
from engine.errors import InvalidRequestError, ModelNotFoundError
from engine.llm_engine import LLMEngine, PromptInput
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.weights import resolve_model


class LLM:
    """Prefill and decode in one process with continuous batching and chunked prefill."""

    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str | torch.dtype = "float32",
        device: str = "cpu",
        block_size: int = 16,
        kv_cache_memory: int = 256 * 2**20,
        num_kv_blocks: int | None = None,
        kv_cache_dtype: str | torch.dtype | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        enable_prefix_caching: bool = True,
        random_weights: bool = False,
        seed: int = 0,
        exact_attention: bool = False,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        expert_parallel_size: int = 1,
        cuda_graphs: bool = True,
        gpu_memory_utilization: float | None = None,
        overlap_scheduling: bool = False,
    ) -> None:
        """``tensor_parallel_size x pipeline_parallel_size`` ranks: this process is rank 0 and starts
        the others as follower processes (`close` stops them); ``expert_parallel_size`` (1 or the
        tensor size) splits an MoE model's experts over the tensor ranks."""
        path = Path(model)
        if not path.exists():
            raise ModelNotFoundError(f"model path not found: {path}")
        cfg_dict, _ = resolve_model(path)
        model_cfg = ModelConfig.from_hf_dict(cfg_dict)
        check_group_shape(
            model_cfg, tensor_parallel_size, pipeline_parallel_size, expert_parallel_size,
            fields=("tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size"),
        )
        max_len = max_model_len or min(model_cfg.max_position_embeddings, 4096)
        kv_dtype = parse_dtype(kv_cache_dtype) if isinstance(kv_cache_dtype, str) else kv_cache_dtype
        if kv_dtype is None and kv_cache_dtype == "fp8":
            kv_dtype = torch.float8_e4m3fn
        self.config = EngineConfig(
            model=str(path),
            dtype=parse_dtype(dtype),
            device=device,
            cache=CacheConfig(
                block_size=block_size, memory_bytes=kv_cache_memory, num_blocks=num_kv_blocks,
                dtype=kv_dtype, enable_prefix_caching=enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=max_len,
            ),
            parallel=ParallelConfig(
                tp_size=tensor_parallel_size, pp_size=pipeline_parallel_size, ep_size=expert_parallel_size
            ),
            seed=seed,
            random_weights=random_weights,
            exact_attention=exact_attention,
            cuda_graphs=cuda_graphs,
            gpu_memory_utilization=gpu_memory_utilization,
            overlap_scheduling=overlap_scheduling,
        )
        self._followers: FollowerSet | None = None
        if self.config.parallel.world_size > 1:
            self._followers = FollowerSet(self.config)
            self.config = rank_config(self.config, 0)
        try:
            self.engine = LLMEngine(self.config)
        except BaseException:
            self.close()
            raise
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the follower ranks (if any) and leave their process group; idempotent."""
        followers, self._followers = self._followers, None
        if followers is None:
            return
        runner = getattr(getattr(self, "engine", None), "runner", None)
        try:
            if isinstance(runner, GroupRunner):
                runner.stop_followers()
                followers.join()
        except GroupRankError:
            pass  # a follower died: the rest are killed below
        finally:
            followers.kill()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Seq[PromptInput],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One `RequestOutput` per prompt, in order. Bad input raises before anything runs."""
        batch = _as_prompt_list(prompts)
        if sampling_params is None:
            params = [SamplingParams()] * len(batch)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(batch)
        else:
            params = list(sampling_params)
            if len(params) != len(batch):
                raise InvalidRequestError(
                    f"sampling_params: {len(params)} given for {len(batch)} prompts"
                )
        # validate everything first so a bad prompt leaves no half-submitted batch behind
        for p in batch:
            self.engine.validate_prompt(self.engine.tokenize(p)[1])
        ids = []
        for prompt, sp in zip(batch, params):
            rid = str(next(self._ids))
            self.engine.add_request(rid, prompt, sp)
            ids.append(rid)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [done[r] for r in ids]


def _as_prompt_list(prompts: PromptInput | Seq[PromptInput]) -> list[PromptInput]:
    """Tell one prompt (str, chat, token ids) from a list of them."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, list | tuple):
        raise InvalidRequestError("prompts: expected a string, chat messages, token ids, or a list of those")
    if not prompts:
        raise InvalidRequestError("prompts: empty list")
    first = prompts[0]
    if isinstance(first, dict) or (isinstance(first, int) and not isinstance(first, bool)):
        return [list(prompts)]  # one chat, or one token-id prompt
    return list(prompts)
