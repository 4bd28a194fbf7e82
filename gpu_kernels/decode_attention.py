"""Paged decode attention: one new query token per sequence against its paged KV.

Decode is bandwidth-bound: each step must read every sequence's whole KV once, so the kernel
is built to read each KV byte exactly once and keep the GPU's memory system busy.

* XQA grouping: one program owns a (sequence, KV head) pair and computes all ``G`` query heads
  that share that KV head, as a ``[G, D] x [D, N]`` product. Each KV tile is read from HBM once
  per KV head instead of once per query head, and the group is padded to 16 rows so any group
  size (1, 3, 4, 8, …) runs on the tensor cores.
* Multi-block (split-K): with few sequences x KV heads there are too few programs to fill the
  SMs; then each sequence's KV range is split across ``num_splits`` programs, each writes an
  unnormalised partial (acc, running max, running sum), and a small reduce kernel merges them
  with a log-sum-exp rescale.
* FP8 (e4m3) KV is converted to the query dtype (exact: every e4m3 value is a bf16/fp16 value)
  and the per-tensor scales are folded into the softmax scale (K) and the output (V).
"""

from __future__ import annotations

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
    next_pow2,
    scale_or_one,
    sm_count,
    tl_dtype,
)
from gpu_kernels.exact_attention import exact_rows_attention
from gpu_kernels.pv_product import accumulate_pv

interpreter_compat.apply()

LOG2E = 1.4426950408889634
# Programs per SM below which the auto heuristic splits sequences (several programs per SM
# keep enough loads in flight; one program of 4 warps per SM does not saturate HBM).
TARGET_PROGRAMS_PER_SM = 2
# A split shorter than this spends more on its partial write and the merge than it saves.
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64
# Per-tile KV bytes for one of K or V on the GPU: 16 KiB keeps 3 pipeline stages of K and V
# well inside shared memory for every head_dim/dtype we support.
_TILE_BYTES = 16 * 1024


def decode_num_splits(
    batch: int,
    num_kv_heads: int,
    max_seq_len: int,
    num_sms: int,
    multi_block: bool | None = None,
) -> int:
    """How many programs share one sequence's KV range.

    ``multi_block=False`` -> 1; ``True`` -> at least 2; ``None`` -> split only when
    ``batch * num_kv_heads`` programs would leave SMs idle, into enough splits to give each SM
    ``TARGET_PROGRAMS_PER_SM`` programs, but never splits shorter than ``MIN_TOKENS_PER_SPLIT``.
    """
    if multi_block is False:
        return 1
    programs = max(1, batch * num_kv_heads)
    target = TARGET_PROGRAMS_PER_SM * num_sms
    if multi_block is None and programs >= target:
        return 1
    splits = min(cdiv(target, programs), cdiv(max(max_seq_len, 1), MIN_TOKENS_PER_SPLIT), MAX_SPLITS)
    if multi_block:
        return max(2, splits)
    return max(1, splits)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_split_kernel(
    q_ptr, kv_ptr, bt_ptr, seq_lens_ptr, k_scale_ptr, v_scale_ptr,
    out_ptr, part_acc_ptr, part_ml_ptr,
    sm_scale, num_splits,
    stride_qb, stride_qh,
    stride_kv_blk, stride_kv_kv, stride_kv_h, stride_kv_slot,
    stride_bt,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
    IS_FP8: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SPLIT_P: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)

    # this split's token range, whole tiles so that only the sequence's last tile is ragged
    tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(tiles, num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(seq_len, start + tiles_per_split * BLOCK_N)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None],
        other=0.0,
    )  # [G, D]
    if IS_FP8:
        q = q.to(DOT_DTYPE)  # K, V are widened to q's dtype below
    score_scale = sm_scale  # softmax scale * log2(e): the loop works in base 2
    if IS_FP8:
        score_scale = score_scale * tl.load(k_scale_ptr)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    kv_head = kv_ptr + kvh.to(tl.int64) * stride_kv_h
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        page = tl.load(bt_row + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        rows = page * stride_kv_blk + (offs_n % PAGE) * stride_kv_slot  # [N]
        k = tl.load(kv_head + rows[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        v = tl.load(kv_head + stride_kv_kv + rows[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        if IS_FP8:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = tl.where(n_mask[None, :], s * score_scale, float("-inf"))  # log2 domain
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = accumulate_pv(acc * alpha[:, None], p, v, SPLIT_P, PRECISION)
        m_i = m_new

    if IS_FP8:
        acc = acc * tl.load(v_scale_ptr)
    if SINGLE:
        # an empty sequence (a padded batch slot) has l_i == 0 and acc == 0: write zeros, like
        # the reference's softmax over no keys, instead of 0/0
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        # partials: acc [B, Hq, S, D], (m, l) [B, Hq, S, 2]; contiguous, float32
        row = (b.to(tl.int64) * (tl.num_programs(1) * GROUP) + heads) * num_splits + split  # [G]
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_mask[:, None])
        tl.store(part_ml_ptr + row * 2, m_i, mask=g_mask)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, num_splits,
    stride_ob, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < num_splits
    row = (b.to(tl.int64) * NUM_HEADS + h) * num_splits + offs_s  # [S]
    m = tl.load(part_ml_ptr + row * 2, mask=s_mask, other=float("-inf"))
    l = tl.load(part_ml_ptr + row * 2 + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty: weights stay 0
    w = tl.exp2(m - m_max)  # empty splits have m = -inf -> weight 0
    acc = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    total = tl.sum(w * l, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


def default_block_n(head_dim: int, kv_dtype: torch.dtype, page: int, on_gpu: bool) -> int:
    """Tokens per loop step: ~16 KiB of K per step on the GPU; one page under the interpreter."""
    if not on_gpu:
        return max(16, min(page, 32))
    esize = torch.empty((), dtype=kv_dtype).element_size()
    return max(16, min(128, _TILE_BYTES // (head_dim * esize)))


def paged_decode_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    multi_block: bool | None = None,
    *,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    fp8_compute_dtype: torch.dtype | None = None,
    split_probs: bool = False,
    exact: bool = False,
) -> torch.Tensor:
    """``q: [B, Hq, D]`` -> ``[B, Hq, D]``; same semantics as ``gpu_kernels.reference``.

    ``multi_block`` forces the split-K path on/off (None: decided from batch, length and SM
    count, see `decode_num_splits`); ``num_splits`` overrides the count outright.
    ``max_seq_len`` is a host-side bound on ``seq_lens`` (the engine knows it); without it the
    block table's capacity is used, so no device->host sync happens and the call can be
    captured in a CUDA graph. ``split_probs=True`` keeps the softmax probabilities at
    ~float32 precision in the P·V product (`gpu_kernels.pv_product`); off by default: it cost
    up to 30% at large batches on H200 (bench/NOTES-kernels.md, item 6). ``exact=True``
    computes in float64 and returns the reference's bits (`gpu_kernels.exact_attention`): slow,
    for verification and reproducibility; the tuning arguments are then ignored.
    """
    check_tensor("q", q, ndim=3, dtypes=(torch.float32, torch.float16, torch.bfloat16))
    ensure_runnable(q)
    dev = q.device
    _, hkv, page, head_dim = check_kv_layer(kv_layer, dev)
    is_fp8 = check_kv_dtype(q, kv_layer)
    batch, hq, qd = q.shape
    if qd != head_dim:
        raise ValueError(f"q: head_dim {qd} != kv_layer head_dim {head_dim}")
    if hq % hkv:
        raise ValueError(f"q: {hq} query heads is not a multiple of {hkv} KV heads")
    check_tensor("block_tables", block_tables, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, device=dev)
    if block_tables.shape[0] != batch:
        raise ValueError(f"block_tables: {block_tables.shape[0]} rows for a batch of {batch}")
    if seq_lens.shape[0] != batch:
        raise ValueError(f"seq_lens: {seq_lens.shape[0]} entries for a batch of {batch}")
    k_scale = check_scale("k_scale", k_scale, dev)
    v_scale = check_scale("v_scale", v_scale, dev)

    if exact:
        rows = torch.arange(batch, dtype=torch.int32, device=dev)
        return exact_rows_attention(q, kv_layer, block_tables, rows, seq_lens, scale, k_scale, v_scale)
    dot_dtype = fp8_dot_dtype(q.dtype, fp8_compute_dtype) if is_fp8 else q.dtype
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0:
        return out
    group = hq // hkv
    on_gpu = q.is_cuda
    bn = block_n or default_block_n(head_dim, kv_layer.dtype, page, on_gpu)
    check_pow2("block_n", bn, 16, 256)
    bound = max_seq_len if max_seq_len is not None else block_tables.shape[1] * page
    splits = num_splits or decode_num_splits(batch, hkv, bound, sm_count(dev), multi_block)
    if splits < 1:
        raise ValueError(f"num_splits: must be >= 1, got {splits}")
    if splits > 1:
        part_acc = torch.empty((batch, hq, splits, head_dim), dtype=torch.float32, device=dev)
        part_ml = torch.empty((batch, hq, splits, 2), dtype=torch.float32, device=dev)
    else:
        part_acc = part_ml = out  # unused
    ks = scale_or_one(k_scale, dev) if is_fp8 else q
    vs = scale_or_one(v_scale, dev) if is_fp8 else q
    _decode_split_kernel[(batch, hkv, splits)](
        q, kv_layer, block_tables, seq_lens, ks, vs,
        out, part_acc, part_ml,
        float(scale) * LOG2E, splits,
        q.stride(0), q.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, next_pow2(group)), HEAD_DIM=head_dim,
        PAGE=page, BLOCK_N=bn, SINGLE=splits == 1,
        IS_FP8=is_fp8, DOT_DTYPE=tl_dtype(dot_dtype),
        PRECISION="ieee" if dot_dtype == torch.float32 else "tf32",
        SPLIT_P=dot_dtype != torch.float32 and split_probs,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if splits > 1:
        _decode_reduce_kernel[(batch, hq)](
            part_acc, part_ml, out, splits,
            out.stride(0), out.stride(1),
            NUM_HEADS=hq, HEAD_DIM=head_dim, SPLITS_PAD=next_pow2(splits),
            num_warps=4,
        )  # fmt: skip
    return out
