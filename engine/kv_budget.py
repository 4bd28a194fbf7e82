"""How many KV bytes a GPU worker can afford: ``gpu_memory_utilization`` of the device, less
what is already used (weights, other processes), the activations of the largest step, the
decode CUDA graphs' memory pool and the sampler's per-row state.

A fixed ``kv_cache_memory`` either wastes an H200 or does not fit a smaller card; sizing from
free memory after the weights are loaded (vLLM's ``gpu_memory_utilization``) fills the card.
The KV pool must exist before the graphs are captured (they bake in its address), so the graph
pool and the activations are *estimated* here, with a margin, rather than measured after.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ModelConfig

# allocator fragmentation and kernel temporaries on top of the tensors we count
_ACTIVATION_MARGIN = 2.0
# float32 [rows, V] tensors the sampler may hold at once (logits, penalised, scaled, probs, noise, ...)
_SAMPLER_VOCAB_TENSORS = 6


class KVBudgetError(ValueError):
    """The device has no room left for a KV cache; the message names the setting to change."""


@dataclass(frozen=True)
class StepShape:
    """The largest step this engine runs: tokens per forward and rows that sample."""

    max_num_batched_tokens: int
    max_num_seqs: int


def activation_bytes(model: ModelConfig, dtype: torch.dtype, tokens: int) -> int:
    """Peak live activations of one forward of ``tokens`` tokens (the MLP's gate_up and its
    product dominate), with a margin."""
    esize = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * model.hidden_size + model.q_size + 2 * model.kv_size + 3 * model.intermediate_size
    return int(tokens * per_token * esize * _ACTIVATION_MARGIN)


def sampler_bytes(model: ModelConfig, rows: int) -> int:
    """Float32 vocab-wide tensors of a sampling step, plus the penalty counts (int32) and
    prompt masks (bool) that `engine.sampling_state` allocates for every row once any row
    uses a penalty."""
    return rows * model.vocab_size * (4 * _SAMPLER_VOCAB_TENSORS + 4 + 1)


def non_kv_reserve(model: ModelConfig, dtype: torch.dtype, shape: StepShape, cuda_graphs: bool) -> int:
    """Bytes to keep free beside the KV pool: the largest step's activations, the sampler, and
    the graph pool (about one decode batch of activations: graphs share one pool)."""
    reserve = activation_bytes(model, dtype, shape.max_num_batched_tokens) + sampler_bytes(model, shape.max_num_seqs)
    if cuda_graphs:
        reserve += activation_bytes(model, dtype, shape.max_num_seqs)
    return reserve


def kv_cache_bytes(total: int, free: int, reserve: int, utilization: float) -> int:
    """``utilization * total`` less what is in use now (``total - free``: our weights and any
    other process) and ``reserve``. Raises `KVBudgetError` when nothing is left."""
    if not 0.0 < utilization <= 1.0:
        raise KVBudgetError(f"gpu_memory_utilization: must be in (0, 1], got {utilization}")
    if not 0 <= free <= total:
        raise KVBudgetError(f"device memory: free {free} is not within total {total}")
    budget = int(utilization * total) - (total - free) - reserve
    if budget <= 0:
        gib = 2**30
        raise KVBudgetError(
            f"gpu_memory_utilization: {utilization} of {total / gib:.1f} GiB leaves no room for a KV cache "
            f"({(total - free) / gib:.1f} GiB in use, {reserve / gib:.1f} GiB kept for activations and graphs); "
            f"raise it, or lower max_num_seqs / max_num_batched_tokens"
        )
    return budget


def device_kv_bytes(
    device: torch.device, model: ModelConfig, dtype: torch.dtype, shape: StepShape,
    utilization: float, cuda_graphs: bool,
) -> int:  # fmt: skip
    """`kv_cache_bytes` for this CUDA device, measured now (call it after loading the weights)."""
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return kv_cache_bytes(total, free, non_kv_reserve(model, dtype, shape, cuda_graphs), utilization)
