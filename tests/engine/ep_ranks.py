"""The rank side of the expert-parallel tests: one process per rank, gloo, results saved to files.

Kept apart from the test module so a spawned rank imports only what it runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from engine.layers.moe import EP_SINGLE, ExpertParallel, ep_moe, route
from engine.model_loader import load_model
from engine.parallel import SINGLE, ParallelGroup
from gpu_kernels import ops
from tests.engine.test_hf_parity import Harness, _seq


def greedy_run(
    model_dir: str, ep: ExpertParallel, prompts: list[list[int]], steps: int, group: ParallelGroup = SINGLE
) -> dict[str, object]:
    """Prefill ``prompts`` in one batch, then ``steps`` greedy decode steps (the last alone)."""
    cfg, model = load_model(model_dir, torch.float32, "cpu", group=group, ep=ep)
    h = Harness(model, cfg.replace(num_kv_heads=cfg.num_kv_heads // group.tp_size))  # this rank's KV heads
    seqs = [(_seq(p, f"s{i}"), len(p), h.blocks(4)) for i, p in enumerate(prompts)]
    logits = [out[-1] for out in h.run(seqs)]
    for step in range(steps):
        live = seqs if step < steps - 1 else seqs[:1]  # a batch of one: one rank dispatches nothing
        for (s, _, _), lg in zip(live, logits):
            s.output_token_ids.append(int(lg.argmax()))
        logits = [out[0] for out in h.run([(s, 1, t) for s, _, t in live])]
    return {"tokens": [s.output_token_ids for s, _, _ in seqs], "last_logits": torch.stack(logits)}


def layer_check(ep: ExpertParallel) -> dict[str, torch.Tensor]:
    """`ep_moe` on this rank's experts vs the whole layer on one rank, for uneven token counts."""
    g = torch.Generator().manual_seed(7)
    experts, hidden, inter = 6, 32, 24
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * 0.2
    w2 = torch.randn(experts, hidden, inter, generator=g) * 0.2
    first, n = ep.local_experts(experts)
    out = {}
    for tokens in (0, 1, 7):
        x = torch.randn(tokens, hidden, generator=g)
        weights, ids = route(torch.randn(tokens, experts, generator=g), 2, True)
        got = ep_moe(x, weights, ids, w13[first : first + n], w2[first : first + n], ep)
        out[f"err{tokens}"] = (got - ops.fused_moe(x, w13, w2, weights, ids)).abs().max() if tokens else got.sum()
    return out


def rank_main(rank: int, world: int, port: int, model_dir: str, out_dir: str, prompts: list[list[int]]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ep = ExpertParallel(rank=rank, size=world)
        tp = ParallelGroup(tp_rank=rank, tp_size=world)
        result = {
            "layer": layer_check(ep),
            "ep": greedy_run(model_dir, ep, prompts, steps=4),
            "tp": greedy_run(model_dir, EP_SINGLE, prompts, steps=4, group=tp),  # experts sliced over tp
            "tp+ep": greedy_run(model_dir, ep, prompts, steps=4, group=tp),
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
