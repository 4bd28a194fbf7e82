"""Build a model on its device and fill it from a checkpoint (or random weights)."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.layers.moe import EP_SINGLE, ExpertParallel
from engine.models.llama import LlamaForCausalLM
from engine.models.mixtral import MoEForCausalLM
from engine.parallel import SINGLE, ParallelGroup
from engine.weights import iter_checkpoint, resolve_model


def build_model(
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: str | torch.device,
    group: ParallelGroup = SINGLE,
    max_positions: int | None = None,
    ep: ExpertParallel = EP_SINGLE,
) -> LlamaForCausalLM:
    """Allocate the model's parameters directly on ``device`` in ``dtype`` (uninitialised).

    ``ep`` splits an MoE model's experts over ranks (a dense model has none to split).
    """
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            # the architecture picks the class: MoE families (cfg.moe set) are the Llama family plus experts
            model = (
                MoEForCausalLM(cfg, group, max_positions, ep)
                if cfg.moe is not None
                else LlamaForCausalLM(cfg, group, max_positions)
            )
    finally:
        torch.set_default_dtype(prev)
    model.cos_sin = model.cos_sin.float()
    return model.eval()


def load_model(
    path: str | Path,
    dtype: torch.dtype,
    device: str | torch.device,
    group: ParallelGroup = SINGLE,
    max_positions: int | None = None,
    random_weights: bool = False,
    seed: int = 0,
    ep: ExpertParallel = EP_SINGLE,
) -> tuple[ModelConfig, LlamaForCausalLM]:
    """Load a HF folder or a .gguf file; with ``random_weights`` only its config.json is read."""
    cfg_dict, source = resolve_model(path)
    cfg = ModelConfig.from_hf_dict(cfg_dict)
    model = build_model(cfg, dtype, device, group, max_positions, ep)
    if random_weights:
        model.init_random_weights(seed)
    else:
        sharded = group.tp_size * group.pp_size * ep.size > 1  # each rank reads only its slices
        model.load_weights(iter_checkpoint(source, lazy=sharded))
    return cfg, model
