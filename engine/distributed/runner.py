"""`GroupRunner`: the model runner of one rank of a tensor/pipeline-parallel group.

Rank 0 keeps the `ModelRunner` contract (run, sample) for the engine: it prepares
the batch as usual, splits it into micro-batches (one per pipeline stage), broadcasts the plan,
runs its stage and samples the logits the last stage returns. Followers loop in `follow`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any

import torch

from engine.attention_metadata import AttentionMetadata
from engine.config import EngineConfig
from engine.distributed.plan import MicroBatch, StepPlan, broadcast_plan, gather_replies
from engine.distributed.stage import StageExecutor
from engine.distributed.world import GroupRankError, World, current_world
from engine.kv_cache_pool import KVCachePool
from engine.model_runner import ForwardOutput, ModelRunner
from engine.models.llama import LayerHook, LlamaForCausalLM
from engine.scheduler import ScheduledSeq


class GroupRunner(ModelRunner):
    def __init__(
        self,
        model: LlamaForCausalLM,
        pool: KVCachePool,
        world: World,
        eos_token_ids: Seq[int] = (),
        seed: int | None = None,
        exact_attention: bool = False,
        *,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
    ) -> None:
        super().__init__(
            model, pool, eos_token_ids, seed=seed, exact_attention=exact_attention,
            max_num_seqs=max_num_seqs, max_model_len=max_model_len, cuda_graphs=False,
        )
        self.world = world
        self.stage = StageExecutor(model, self.caches, world)
        self._logits: torch.Tensor | None = None
        # KV transfer to/from another group (worker_runtime.group_kv): on rank 0 the hub that
        # hands out each step's pushes and collects the followers' reports; on a follower its
        # rank's transport side, set by the command that opens it
        self.kv: Any = None

    def plan(self, scheduled: Seq[ScheduledSeq], block_tables: Seq[Seq[int]]) -> StepPlan:
        """The step as micro-batches: contiguous runs of sequences, one per stage (one without stages)."""
        n = len(scheduled)
        parts = min(self.world.pp_size, n)
        bounds = [k * n // parts for k in range(parts + 1)]
        mbs = []
        for a, b in itertools.pairwise(bounds):
            ids, meta = self.prepare(scheduled[a:b], block_tables[a:b])
            samples = torch.tensor([i for i, s in enumerate(scheduled[a:b]) if s.samples], dtype=torch.int64)
            rows = (meta.query_start_loc[1:].cpu().long() - 1)[samples]
            mbs.append(MicroBatch.of(ids, meta, rows))
        return StepPlan(mbs, exact_attention=self.exact_attention)

    def forward(
        self, scheduled: Seq[ScheduledSeq], block_tables: Seq[Seq[int]], on_layer_done: LayerHook | None = None
    ) -> tuple[torch.Tensor, AttentionMetadata]:
        """Runs the whole group's step; the logits wait for `sample` (the hidden states stay on the last stage)."""
        try:
            plan = self.plan(scheduled, block_tables)
            plan.kv = self.kv.orders() if self.kv is not None else None
            plan = broadcast_plan(plan, self.world.control)
            self._logits = self.stage.run(plan, on_layer_done)
            if plan.kv is not None:
                self.kv.collect(gather_replies(None, self.world.control))
        except RuntimeError as e:  # gloo/NCCL report a dead peer as a RuntimeError of the collective
            raise GroupRankError(f"a rank of this worker group is gone: {e}") from e
        _, meta, _ = plan.micro_batches[-1].on(self.device)
        empty = torch.empty(0, device=self.device)
        return (self._logits if self._logits is not None else empty), meta

    def run(
        self, scheduled: Seq[ScheduledSeq], block_tables: Seq[Seq[int]], on_layer_done: LayerHook | None = None
    ) -> ForwardOutput:
        """The group's step (never the single-rank decode graphs: the followers need the plan);
        the last stage's logits come back in scheduled order and are put in row order for `sample`."""
        sampling, by_row, seqs = self.assign_rows(scheduled)
        logits, meta = self.forward(scheduled, block_tables, on_layer_done)
        self._logits = None
        if not seqs or logits.numel() == 0:
            return ForwardOutput(seqs, None, logits, meta, decode_path=False)
        order = {i: k for k, i in enumerate(sampling)}
        rows = torch.tensor([order[i] for i in by_row], dtype=torch.int64, device=logits.device)
        return ForwardOutput(seqs, logits[rows], logits, meta, decode_path=False)

    def follow(self) -> None:
        """A follower's life: run rank 0's plans until it says stop."""
        while True:
            plan = broadcast_plan(None, self.world.control)
            if plan.stop:
                return
            if plan.kv is not None and not plan.micro_batches:
                gather_replies(plan.kv.apply(self), self.world.control)
                continue
            pushes = plan.kv if self.kv is not None else None
            self.stage.run(plan, self.kv.layer_hook(pushes) if pushes is not None else None)
            if plan.kv is not None:
                gather_replies(self.kv.finish(pushes) if pushes is not None else None, self.world.control)

    def kv_command(self, command: Any) -> list[Any]:
        """Rank 0, between steps: every follower applies ``command`` (``command.apply(runner)``);
        their replies in rank order (rank 0's own slot is None)."""
        try:
            broadcast_plan(StepPlan(kv=command), self.world.control)
            return gather_replies(None, self.world.control)
        except RuntimeError as e:
            raise GroupRankError(f"a rank of this worker group is gone: {e}") from e

    def stop_followers(self) -> None:
        """Rank 0: release the followers from `follow`; raises `GroupRankError` when one is gone."""
        try:
            broadcast_plan(StepPlan(stop=True), self.world.control)
        except RuntimeError as e:
            raise GroupRankError(f"a rank of this worker group is gone: {e}") from e


def make_runner(
    model: LlamaForCausalLM, pool: KVCachePool, eos_token_ids: Seq[int], cfg: EngineConfig
) -> ModelRunner:
    """A plain `ModelRunner` for one rank, a `GroupRunner` inside a worker group."""
    if cfg.parallel.world_size == 1:
        return ModelRunner(
            model, pool, eos_token_ids, seed=cfg.seed, exact_attention=cfg.exact_attention,
            max_num_seqs=cfg.scheduler.max_num_seqs, max_model_len=cfg.scheduler.max_model_len,
            cuda_graphs=cfg.cuda_graphs,
        )
    world = current_world()
    if world is None:
        raise ValueError("parallel: a tp/pp group needs `engine.distributed.init_world` first")
    return GroupRunner(
        model, pool, world, eos_token_ids, seed=cfg.seed, exact_attention=cfg.exact_attention,
        max_num_seqs=cfg.scheduler.max_num_seqs, max_model_len=cfg.scheduler.max_model_len,
    )
