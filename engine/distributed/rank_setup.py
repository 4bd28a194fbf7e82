"""What one rank of a group builds: its shard of the model and the KV pool of its heads and layers.

Shared by rank 0 (`LLMEngine`) and the followers, so both hold exactly matching pools: every
rank has the same number of blocks (rank 0's block ids address every rank's pool), sized for the
largest stage so that the memory budget holds on each rank.
"""

from __future__ import annotations

import dataclasses

from engine.config import CacheConfig, EngineConfig, ModelConfig
from engine.kv_cache_pool import KVLayout
from engine.layers.moe import EP_SINGLE, ExpertParallel
from engine.model_loader import load_model
from engine.models.llama import LlamaForCausalLM
from engine.parallel import ParallelGroup, stage_layers


def rank_group(cfg: EngineConfig) -> tuple[ParallelGroup, ExpertParallel]:
    """This rank's tensor/pipeline group and its expert split (experts over the stage's tensor ranks)."""
    group = ParallelGroup.from_config(cfg.parallel)
    p = cfg.parallel
    ep = EP_SINGLE if p.ep_size == 1 else ExpertParallel(rank=p.tp_rank, size=p.ep_size, group=group.pg)
    return group, ep


def load_rank_model(cfg: EngineConfig) -> tuple[ModelConfig, LlamaForCausalLM]:
    group, ep = rank_group(cfg)
    return load_model(
        cfg.model, cfg.dtype, cfg.device, group=group, max_positions=cfg.scheduler.max_model_len,
        random_weights=cfg.random_weights, seed=cfg.seed, ep=ep,
    )


def rank_kv_layout(model_cfg: ModelConfig, cfg: EngineConfig, cache: CacheConfig | None = None) -> KVLayout:
    """The KV layout of this rank: its KV heads, its stage's layers, the group's block count
    (``cache``: the budget to size from, when the engine measured one; else ``cfg.cache``)."""
    p = cfg.parallel
    group = ParallelGroup(tp_rank=p.tp_rank, tp_size=p.tp_size, pp_rank=p.pp_rank, pp_size=p.pp_size)
    heads = group.local_kv_heads(model_cfg.num_kv_heads)
    widest = max(len(stage_layers(model_cfg.num_layers, s, p.pp_size)) for s in range(p.pp_size))
    budget = cache or cfg.cache
    layout = KVLayout.for_budget(model_cfg.replace(num_layers=widest), budget, cfg.dtype, num_kv_heads=heads)
    return dataclasses.replace(layout, num_layers=len(group.stage_layers(model_cfg.num_layers)))
