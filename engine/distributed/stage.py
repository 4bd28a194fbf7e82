"""One pipeline stage's forward over the micro-batches of a step.

Stage ``s`` embeds (first stage) or receives ``[hidden; residual]`` from stage ``s-1``, runs its
layers, and sends on to stage ``s+1`` without waiting (``isend``), so stage 0 computes
micro-batch ``m+1`` while stage 1 computes ``m``. The last stage computes the sampled rows'
logits (all tensor ranks: the LM head is vocab-parallel) and its tensor rank 0 sends them to
rank 0, which samples. Tensor-parallel ranks of a stage exchange only their all-reduces.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from engine.attention import LayerKV
from engine.distributed.plan import MicroBatch, StepPlan
from engine.distributed.world import World
from engine.models.llama import LayerHook, LlamaForCausalLM
from gpu_kernels import ops


class StageExecutor:
    """Runs this rank's layers of a `StepPlan`; ``caches[j]`` is the KV of the stage's j-th layer."""

    def __init__(self, model: LlamaForCausalLM, caches: list[LayerKV], world: World) -> None:
        self.model = model
        self.caches = caches
        self.world = world
        self.layers = model.group.stage_layers(model.cfg.num_layers)
        if len(caches) != len(self.layers):
            raise ValueError(f"KV pool holds {len(caches)} layers, stage {world.pp_rank} runs {len(self.layers)}")
        self.first = world.pp_rank == 0
        self.last = world.pp_rank == world.pp_size - 1
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype

    @torch.inference_mode()
    def run(self, plan: StepPlan, on_layer_done: LayerHook | None = None) -> torch.Tensor | None:
        """Rank 0 gets the sampled rows' logits ``[N, V]`` of all micro-batches in order (None if none)."""
        sends: list[tuple[object, torch.Tensor]] = []
        local: list[torch.Tensor] = []
        with ops.exact_attention() if plan.exact_attention else contextlib.nullcontext():
            for mb in plan.micro_batches:
                out = self._micro_batch(mb, on_layer_done, sends)
                if out is not None:
                    local.append(out)
        got = local if self.world.rank == 0 and self.last else self._receive_logits(plan)
        for work, _ in sends:
            work.wait()  # type: ignore[attr-defined]
        return torch.cat(got) if got else None

    def _micro_batch(
        self, mb: MicroBatch, hook: LayerHook | None, sends: list[tuple[object, torch.Tensor]]
    ) -> torch.Tensor | None:
        ids, meta, rows = mb.on(self.device)
        model, world = self.model, self.world
        residual: torch.Tensor | None = None
        if self.first:
            h = model.embed_tokens(ids)
        else:
            buf = torch.empty((2, mb.num_tokens, model.cfg.hidden_size), dtype=self.dtype, device=self.device)
            dist.recv(buf, src=world.peer(world.pp_rank - 1))
            h, residual = buf[0], buf[1]
        for j, i in enumerate(self.layers):
            h, residual = model.layers[i](meta.positions, h, residual, self.caches[j], meta, model.cos_sin)
            if hook is not None:
                hook(i)
        assert residual is not None  # every stage holds at least one layer
        if not self.last:
            buf = torch.stack([h, residual]).contiguous()
            sends.append((dist.isend(buf, dst=world.peer(world.pp_rank + 1)), buf))
            return None
        if rows.numel() == 0:
            return None
        logits = model.logits(model.norm(h, residual)[0][rows]).contiguous()
        if world.rank != 0 and world.tp_rank == 0:
            dist.send(logits, dst=0)
        return logits

    def _receive_logits(self, plan: StepPlan) -> list[torch.Tensor]:
        """Rank 0 of a pipeline: the last stage's logits, one message per micro-batch that samples."""
        if self.world.rank != 0:
            return []
        got = []
        src = self.world.peer(self.world.pp_size - 1, 0)
        for mb in plan.micro_batches:
            if mb.sample_rows.numel():
                buf = torch.empty((mb.sample_rows.numel(), self.model.cfg.vocab_size), device=self.device)
                dist.recv(buf, src=src)
                got.append(buf)
        return got
