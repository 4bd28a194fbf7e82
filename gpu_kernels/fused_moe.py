"""Fused Mixture-of-Experts MLP: two grouped GEMMs over (token, expert) pairs sorted by expert.

The vLLM/SGLang ``fused_moe`` shape. `align` (twin: `moe_reference.moe_align`) sorts the ``T * k``
pairs by expert and pads each expert's run to ``BLOCK_M``, so every M-block of the sorted list reads
one expert's weights: a program loads that expert's ``[BLOCK_N, BLOCK_K]`` tiles once for up to ``BLOCK_M`` tokens.

1. ``_gate_up_kernel``: ``silu(x W_gate^T) * (x W_up^T)`` for the block's pairs, gate and up tiles
   in one pass (two accumulators), written as ``inter [P, I]`` in the activation dtype.
2. ``_down_kernel``: ``inter W_down^T`` times the pair's routing weight, ``[P, H]`` float32.
The ``k`` pair rows of each token are then summed in float32 and cast (the reference's order).
Rounding follows `gpu_kernels.moe_reference.fused_moe` step by step: the projections are
rounded to the activation dtype, silu is rounded before the multiply.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gpu_kernels import interpreter_compat
from gpu_kernels.checks import FLOAT_DTYPES, INDEX_DTYPES, cdiv, check_pow2, check_tensor, ensure_runnable

interpreter_compat.apply()


@dataclass(frozen=True)
class MoETiles:
    """Tile sizes; small ``BLOCK_M`` for decode batches (few pairs per expert), larger for prefill."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


def default_config(num_pairs: int, num_experts: int, interpreted: bool = False) -> MoETiles:
    """A tile choice by pairs per expert (no autotuning: one compile per shape class)."""
    if interpreted:
        return MoETiles(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=1)
    per_expert = num_pairs / max(1, num_experts)
    if per_expert <= 16:
        return MoETiles(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
    if per_expert <= 64:
        return MoETiles(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=4)
    return MoETiles(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)


@triton.jit
def _align_kernel(
    ids_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, num_pairs, num_experts,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
):
    """One program: `moe_reference.moe_align` in one launch (a decode step cannot afford ~15 torch ops).

    Experts in order; each scans the ids in chunks, placing its pairs by a running cumsum (so in
    increasing pair order, as the reference's stable sort), then pads its run to ``BLOCK_M``.
    Entries past ``num_padded`` stay unwritten: the GEMM programs there return before reading.
    """
    total = 0
    offs = tl.arange(0, CHUNK)
    pad = tl.arange(0, BLOCK_M)
    for e in range(num_experts):
        count = 0
        for p0 in range(0, num_pairs, CHUNK):
            ids = tl.load(ids_ptr + p0 + offs, mask=p0 + offs < num_pairs, other=-1)
            hit = (ids == e).to(tl.int32)
            dest = total + count + tl.cumsum(hit, 0) - 1
            tl.store(sorted_ptr + dest, (p0 + offs).to(tl.int32), mask=hit > 0)
            count += tl.sum(hit, 0)
        padded = (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        tl.store(sorted_ptr + total + count + pad, num_pairs, mask=count + pad < padded)
        for b0 in range(0, padded, BLOCK_M * CHUNK):
            blk = b0 // BLOCK_M + offs
            tl.store(block_expert_ptr + total // BLOCK_M + blk, e, mask=blk < padded // BLOCK_M)
        total += padded
    tl.store(num_padded_ptr, total)


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`moe_reference.moe_align` as one kernel; entries past ``num_padded`` are unspecified."""
    flat = topk_ids.reshape(-1)
    num_pairs = flat.numel()
    capacity = num_pairs + num_experts * (block_m - 1)
    sorted_pairs = torch.empty(capacity, dtype=torch.int32, device=flat.device)
    block_expert = torch.empty(cdiv(capacity, block_m), dtype=torch.int32, device=flat.device)
    num_padded = torch.empty(1, dtype=torch.int32, device=flat.device)
    chunk = min(1024, max(16, triton.next_power_of_2(num_pairs)))
    _align_kernel[(1,)](flat, sorted_pairs, block_expert, num_padded, num_pairs, num_experts, BLOCK_M=block_m,
                        CHUNK=chunk)
    return sorted_pairs, block_expert, num_padded


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, out_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_pairs, inter, hidden, top_k,
    stride_xm, stride_we, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ptr + offs_m).to(tl.int64)
    row_ok = pairs < num_pairs
    tokens = pairs // top_k
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tokens[:, None] * stride_xm + offs_k[None, :]
    w_base = w_ptr + expert * stride_we
    g_ptrs = w_base + offs_n[None, :] * stride_wn + offs_k[:, None]
    u_ptrs = w_base + (inter + offs_n[None, :]) * stride_wn + offs_k[:, None]
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = offs_k < hidden - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        u = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    dt = out_ptr.dtype.element_ty
    gate = acc_g.to(dt).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    y = silu * acc_u.to(dt).to(tl.float32)
    o_ptrs = out_ptr + pairs[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, y.to(dt), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    a_ptr, w_ptr, out_ptr, weight_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_pairs, hidden, inter,
    stride_am, stride_we, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ptr + offs_m).to(tl.int64)
    row_ok = pairs < num_pairs
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + pairs[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_ok = offs_k < inter - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y = acc.to(a_ptr.dtype.element_ty).to(tl.float32)  # the reference's bmm output, rounded
    route_w = tl.load(weight_ptr + pairs, mask=row_ok, other=0.0)
    o_ptrs = out_ptr + pairs[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, y * route_w[:, None], mask=row_ok[:, None] & col_ok[None, :])


def _check(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> None:
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    ensure_runnable(x)
    num_experts, two_inter, hidden = w13.shape if w13.dim() == 3 else (0, 0, 0)
    check_tensor("w13", w13, ndim=3, dtypes=(x.dtype,), device=x.device)
    check_tensor("w2", w2, ndim=3, dtypes=(x.dtype,), device=x.device)
    if hidden != x.shape[1] or two_inter % 2 or tuple(w2.shape) != (num_experts, hidden, two_inter // 2):
        raise ValueError(
            f"w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)}: expected [E, 2I, {x.shape[1]}] and [E, H, I]"
        )
    check_tensor("topk_ids", ids, ndim=2, dtypes=INDEX_DTYPES, device=x.device)
    check_tensor("topk_weights", weights, ndim=2, dtypes=(torch.float32,), device=x.device)
    if ids.shape[0] != x.shape[0] or weights.shape != ids.shape:
        raise ValueError(f"topk_ids {tuple(ids.shape)} / topk_weights {tuple(weights.shape)}: expected [T, k]")


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: MoETiles | None = None,
) -> torch.Tensor:
    """Same contract as `gpu_kernels.moe_reference.fused_moe`; ids outside ``[0, E)`` are dropped."""
    _check(x, w13, w2, topk_weights, topk_ids)
    w13, w2 = w13.contiguous(), w2.contiguous()
    x = x.contiguous()
    num_tokens, top_k = topk_ids.shape
    num_experts, hidden, inter = w2.shape
    num_pairs = num_tokens * top_k
    cfg = config or default_config(num_pairs, num_experts, interpreted=not x.is_cuda)
    for name in ("block_m", "block_n", "block_k"):
        check_pow2(name, getattr(cfg, name), 16, 256)
    if num_pairs == 0:
        return torch.zeros_like(x)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # float32 models get float32 products
    sorted_pairs, block_expert, num_padded = align(topk_ids, num_experts, cfg.block_m)
    grid_m = block_expert.numel()
    inter_act = torch.empty((num_pairs, inter), dtype=x.dtype, device=x.device)
    _gate_up_kernel[(grid_m, cdiv(inter, cfg.block_n))](
        x, w13, inter_act, sorted_pairs, block_expert, num_padded,
        num_pairs, inter, hidden, top_k,
        x.stride(0), w13.stride(0), w13.stride(1), inter_act.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    # pairs no rank-local expert serves are never written: zero rows, so the sum skips them
    per_pair = torch.zeros((num_pairs, hidden), dtype=torch.float32, device=x.device)
    _down_kernel[(grid_m, cdiv(hidden, cfg.block_n))](
        inter_act, w2, per_pair, topk_weights.contiguous().reshape(-1), sorted_pairs, block_expert, num_padded,
        num_pairs, hidden, inter,
        inter_act.stride(0), w2.stride(0), w2.stride(1), per_pair.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return per_pair.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)
