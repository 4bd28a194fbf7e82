"""Paged context (prefill) attention: a varlen batch of prompt chunks over paged KV.

Prefill is FLOP-bound, so this is flash attention (online softmax in registers, never an
[L, L] matrix in memory) with two changes for serving:

* Keys and values come from the paged cache through the block table, so one kernel serves
  a fresh prompt, a chunk of a long prompt (chunked prefill) and a prompt whose prefix was a
  cache hit: each chunk's queries sit at the end of its sequence and see its whole cached
  prefix plus the causal part of the chunk. The chunk's own KV is written to the cache first.
* The key loop runs in two phases: tiles wholly visible to every query row of the program
  run without a mask; only the last ``ceil(BLOCK_M / BLOCK_N) + 1`` tiles (the diagonal)
  pay for the causal and length masks.

Programs whose query tile lies beyond their chunk exit at once; the grid is sized by the
longest chunk (``max_query_len``), and tiles are issued longest-first for load balance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gpu_kernels import interpreter_compat
from gpu_kernels.checks import (
    INDEX_DTYPES,
    cdiv,
    check_kv_dtype,
    check_kv_layer,
    check_pow2,
    check_scale,
    check_tensor,
    ensure_runnable,
    fp8_dot_dtype,
    scale_or_one,
    tl_dtype,
)
from gpu_kernels.exact_attention import context_rows, exact_rows_attention
from gpu_kernels.pv_product import accumulate_pv

interpreter_compat.apply()

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class ContextConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_context_config(
    head_dim: int, dtype: torch.dtype, on_gpu: bool, max_query_len: int = 4096
) -> ContextConfig:
    """Tile shapes, from the H100 sweeps in bench/NOTES-kernels.md (bf16, d=128).

    Short chunks want small query tiles (more programs, less causal waste on the diagonal);
    long ones want 256-row tiles (each K/V tile feeds twice the math). fp32 and d=256 need
    smaller tiles to fit shared memory; the interpreter wants the fewest operations.
    """
    if not on_gpu:
        return ContextConfig(16, 16, 4, 1)
    if dtype == torch.float32 or head_dim > 128:
        return ContextConfig(64, 32, 4, 2)
    if max_query_len <= 1024:
        return ContextConfig(64, 32, 4, 4)
    return ContextConfig(256, 64, 8, 3)


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, kv_head, bt_row, n0, q_pos, seq_len,
    score_scale, stride_kv_blk, stride_kv_kv, stride_kv_slot,
    offs_d, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, IS_FP8: tl.constexpr, PRECISION: tl.constexpr, SPLIT_P: tl.constexpr,
):  # fmt: skip
    """One key tile of the online softmax; ``MASKED`` adds the causal and length masks."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        n_mask = offs_n < seq_len
        page = tl.load(bt_row + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
    else:
        page = tl.load(bt_row + offs_n // PAGE).to(tl.int64)
    rows = page * stride_kv_blk + (offs_n % PAGE) * stride_kv_slot
    if MASKED:
        k = tl.load(kv_head + rows[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        v = tl.load(kv_head + stride_kv_kv + rows[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
    else:
        k = tl.load(kv_head + rows[:, None] + offs_d[None, :])
        v = tl.load(kv_head + stride_kv_kv + rows[:, None] + offs_d[None, :])
    if IS_FP8:
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * score_scale
    if MASKED:
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = accumulate_pv(acc * alpha[:, None], p, v, SPLIT_P, PRECISION)
    return acc, m_new, l_i


@triton.jit
def _context_kernel(
    q_ptr, kv_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, k_scale_ptr, v_scale_ptr, out_ptr,
    sm_scale,
    stride_qt, stride_qh,
    stride_kv_blk, stride_kv_kv, stride_kv_h, stride_kv_slot,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_FP8: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SPLIT_P: tl.constexpr,
):  # fmt: skip
    m_tile = tl.num_programs(0) - 1 - tl.program_id(0)  # longest (last) tiles first
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b).to(tl.int32)
    q_len = tl.load(qsl_ptr + b + 1).to(tl.int32) - q_start
    if m_tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    prefix = seq_len - q_len

    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < q_len
    tok = (q_start + offs_m).to(tl.int64)
    q_ptrs = q_ptr + tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None], other=0.0)
    if IS_FP8:
        q = q.to(DOT_DTYPE)  # K, V are widened to q's dtype in _attend_tile
    q_pos = prefix + offs_m  # rows past the chunk see up to seq_len - 1: finite, never stored

    score_scale = sm_scale  # softmax scale * log2(e): the loop works in base 2
    if IS_FP8:
        score_scale = score_scale * tl.load(k_scale_ptr)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    kv_head = kv_ptr + (h // GROUP).to(tl.int64) * stride_kv_h
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt

    # keys < prefix + first row's offset are visible to every row: no mask
    first_row_pos = prefix + m_tile * BLOCK_M
    full_end = (first_row_pos // BLOCK_N) * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, kv_head, bt_row, n0, q_pos, seq_len,
            score_scale, stride_kv_blk, stride_kv_kv, stride_kv_slot,
            offs_d, HEAD_DIM, PAGE, BLOCK_N, False, IS_FP8, PRECISION, SPLIT_P,
        )  # fmt: skip
    diag_end = tl.minimum(seq_len, first_row_pos + BLOCK_M)
    for n0 in range(full_end, diag_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, kv_head, bt_row, n0, q_pos, seq_len,
            score_scale, stride_kv_blk, stride_kv_kv, stride_kv_slot,
            offs_d, HEAD_DIM, PAGE, BLOCK_N, True, IS_FP8, PRECISION, SPLIT_P,
        )  # fmt: skip

    if IS_FP8:
        acc = acc * tl.load(v_scale_ptr)
    out = acc / l_i[:, None]  # every row sees key 0, so l_i > 0
    o_ptrs = out_ptr + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


def paged_context_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    max_query_len: int | None = None,
    *,
    config: ContextConfig | None = None,
    fp8_compute_dtype: torch.dtype | None = None,
    split_probs: bool = False,
    exact: bool = False,
) -> torch.Tensor:
    """``q: [T, Hq, D]`` new tokens -> ``[T, Hq, D]``; same semantics as ``gpu_kernels.reference``.

    ``max_query_len`` (the longest chunk, which the scheduler knows) sizes the grid; without it
    it is read from ``query_start_loc``, a device->host sync. ``split_probs=True`` keeps the
    probabilities at ~float32 precision in P·V (`gpu_kernels.pv_product`); off by default: the
    extra product cost 14-53% of throughput on H200 (bench/NOTES-kernels.md, item 6).
    ``exact=True`` computes in float64 and returns the reference's bits
    (`gpu_kernels.exact_attention`): slow, for verification and reproducibility.
    """
    check_tensor("q", q, ndim=3, dtypes=(torch.float32, torch.float16, torch.bfloat16))
    ensure_runnable(q)
    dev = q.device
    _, hkv, page, head_dim = check_kv_layer(kv_layer, dev)
    is_fp8 = check_kv_dtype(q, kv_layer)
    num_tokens, hq, qd = q.shape
    if qd != head_dim:
        raise ValueError(f"q: head_dim {qd} != kv_layer head_dim {head_dim}")
    if hq % hkv:
        raise ValueError(f"q: {hq} query heads is not a multiple of {hkv} KV heads")
    check_tensor("block_tables", block_tables, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    check_tensor("query_start_loc", query_start_loc, ndim=1, dtypes=INDEX_DTYPES, device=dev)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, device=dev)
    batch = seq_lens.shape[0]
    if query_start_loc.shape[0] != batch + 1:
        raise ValueError(
            f"query_start_loc: expected {batch + 1} entries (batch + 1), got {query_start_loc.shape[0]}"
        )
    if block_tables.shape[0] != batch:
        raise ValueError(f"block_tables: {block_tables.shape[0]} rows for a batch of {batch}")
    k_scale = check_scale("k_scale", k_scale, dev)
    v_scale = check_scale("v_scale", v_scale, dev)

    if exact and num_tokens and batch:
        rows, lens = context_rows(query_start_loc, seq_lens, num_tokens)
        return exact_rows_attention(q, kv_layer, block_tables, rows, lens, scale, k_scale, v_scale)
    dot_dtype = fp8_dot_dtype(q.dtype, fp8_compute_dtype) if is_fp8 else q.dtype
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_tokens == 0 or batch == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item())
    if max_query_len <= 0:
        return out
    cfg = config or default_context_config(head_dim, q.dtype, q.is_cuda, max_query_len)
    check_pow2("config.block_m", cfg.block_m, 16, 256)
    check_pow2("config.block_n", cfg.block_n, 16, 256)
    ks = scale_or_one(k_scale, dev) if is_fp8 else q
    vs = scale_or_one(v_scale, dev) if is_fp8 else q
    grid = (cdiv(max_query_len, cfg.block_m), hq, batch)
    _context_kernel[grid](
        q, kv_layer, block_tables, query_start_loc, seq_lens, ks, vs, out,
        float(scale) * LOG2E,
        q.stride(0), q.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=hq // hkv, HEAD_DIM=head_dim, PAGE=page,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        IS_FP8=is_fp8, DOT_DTYPE=tl_dtype(dot_dtype),
        PRECISION="ieee" if dot_dtype == torch.float32 else "tf32",
        SPLIT_P=dot_dtype != torch.float32 and split_probs,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
