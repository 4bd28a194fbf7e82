"""Plain-torch twins of the fused-MoE kernels: block alignment and the grouped expert MLP.

The grouped MLP sorts (token, expert) pairs by expert, packs each expert's pairs into one row of a
padded ``[E, C, H]`` batch and runs two batched matmuls: one GEMM per projection for all experts,
no Python loop over experts. Padding costs ``E * C`` rows; CPU runs are small enough for that.
"""

from __future__ import annotations

import torch

from gpu_kernels.reference import silu_mul


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the flattened (token, slot) pairs by expert, each expert's run padded to ``block_m``.

    Returns ``(sorted_pairs, block_expert, num_padded)``: ``sorted_pairs[i]`` is a pair index
    ``t * k + j`` or ``P = T * k`` (padding); block ``b`` of ``block_m`` entries belongs to expert
    ``block_expert[b]``; ``num_padded`` (a 1-element tensor) is how many entries are real blocks.
    Sized by the bound ``P + E * (block_m - 1)`` so nothing waits on the device. Ids outside
    ``[0, E)`` (pairs another expert-parallel rank serves) are dropped.
    """
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    dev = flat.device
    valid = (flat >= 0) & (flat < num_experts)
    bucket = torch.where(valid, flat, torch.full_like(flat, num_experts))
    counts = torch.bincount(bucket, minlength=num_experts + 1)[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.argsort(bucket, stable=True)
    first = torch.cumsum(counts, 0) - counts  # where each expert's pairs begin in `order`
    sorted_bucket = bucket[order]
    keep = sorted_bucket < num_experts
    e_of = sorted_bucket[keep]
    rank = torch.arange(num_pairs, device=dev)[keep] - first[e_of]
    capacity = num_pairs + num_experts * (block_m - 1)
    sorted_pairs = torch.full((capacity,), num_pairs, dtype=torch.int32, device=dev)
    sorted_pairs[starts[e_of] + rank] = order[keep].to(torch.int32)
    num_blocks = (capacity + block_m - 1) // block_m
    block_start = torch.arange(num_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(ends, block_start, right=True).clamp(max=num_experts - 1)
    return sorted_pairs, block_expert.to(torch.int32), ends[-1:].to(torch.int32)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """``sum_j w_j * down_e(silu(gate_e(x)) * up_e(x))`` over each token's experts ``e = ids[t, j]``.

    ``x [T, H]``, ``w13 [E, 2I, H]`` (gate rows, then up rows), ``w2 [E, H, I]``, ``topk_* [T, k]``.
    Ids outside ``[0, E)`` contribute nothing (expert parallelism's pairs for other ranks).
    The per-pair outputs are weighted and summed in float32, then cast to ``x.dtype``.
    """
    num_tokens, k = topk_ids.shape
    num_experts = w13.shape[0]
    flat = topk_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    pair = torch.nonzero(valid).squeeze(1)
    expert = flat[pair]
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    if pair.numel() == 0:
        return out.to(x.dtype)
    order = torch.argsort(expert, stable=True)
    pair, expert = pair[order], expert[order]
    counts = torch.bincount(expert, minlength=num_experts)
    rank = torch.arange(pair.numel(), device=x.device) - (torch.cumsum(counts, 0) - counts)[expert]
    capacity = int(counts.max())
    packed = x.new_zeros(num_experts, capacity, x.shape[1])
    packed[expert, rank] = x[pair // k]
    h = torch.bmm(packed, w13.transpose(1, 2))  # [E, C, 2I]
    y = torch.bmm(silu_mul(h), w2.transpose(1, 2))  # [E, C, H]
    contrib = y[expert, rank].float() * topk_weights.reshape(-1)[pair].float()[:, None]
    out.index_add_(0, pair // k, contrib)
    return out.to(x.dtype)
