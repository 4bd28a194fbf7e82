"""Exact-numerics attention: computed in float64, rounded once, the same bits as the reference.

Why it exists: a bf16 model amplifies a one-ulp difference in one attention output into a
different greedy token within a few steps (a random-weight Llama-8B parts from itself after
~1-20 tokens, bench/model_check.py), so the fast kernels, which round where flash attention
must (probabilities to bf16 before P·V, an online softmax in float32), cannot reproduce the
torch reference token for token. Here every product of two 16-bit values is exact in float64,
a sum of 128 of them is exact too, and the softmax's float64 error is ~1e-16, far below the
bf16 rounding step, so the result rounds (float64 -> float32 -> output dtype, as the
reference casts) to the reference's bits except with a probability of order 1e-12 per element.

That buys two things: a whole model on the kernels reproduces the references' tokens, which
tells a kernel bug from rounding; and the result no longer depends on tiling, splits or batch
composition. The price is speed: no tensor cores (Triton 3.6 cannot lower a float64 ``tl.dot``
on sm_90, so the products are broadcast multiplies and sums) and one program per (query token,
KV head) reading that token's whole prefix. It is a verification and reproducibility mode,
selected with `gpu_kernels.ops.exact_attention` or the engine's ``exact_attention`` option.

Prefill uses the same kernel as decode: query ``i`` of a chunk is one "decode" row whose length
is its own position + 1, with its sequence's block table row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_kernels import interpreter_compat
from gpu_kernels.checks import next_pow2, scale_or_one

interpreter_compat.apply()

# Keys per loop step: the [G, N, D] float64 products live in registers.
_BLOCK_N = 16


@triton.jit
def _exact_kernel(
    q_ptr, kv_ptr, bt_ptr, row_ptr, len_ptr, k_scale_ptr, v_scale_ptr, out_ptr, scale_ptr,
    stride_qt, stride_qh,
    stride_kv_blk, stride_kv_kv, stride_kv_h, stride_kv_slot,
    stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, IS_FP8: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    seq_len = tl.load(len_ptr + t).to(tl.int32)
    bt_row = bt_ptr + tl.load(row_ptr + t).to(tl.int64) * stride_bt

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP
    q = tl.load(q_ptr + t * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None], other=0.0)
    q = q.to(tl.float32).to(tl.float64)  # widened through float32: exact, and the interpreter's bf16 path
    sm_scale = tl.load(scale_ptr)  # float64: a scalar argument would arrive rounded to float32
    if IS_FP8:
        k_scale = tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float64)
    l_i = tl.zeros([GROUP_PAD], tl.float64)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float64)
    kv_head = kv_ptr + kvh.to(tl.int64) * stride_kv_h
    for n0 in range(0, seq_len, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < seq_len
        page = tl.load(bt_row + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        rows = page * stride_kv_blk + (offs_n % PAGE) * stride_kv_slot
        k = tl.load(kv_head + rows[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0).to(tl.float32)
        v = tl.load(kv_head + stride_kv_kv + rows[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        v = v.to(tl.float32)
        if IS_FP8:  # dequantised in float32, as the reference's gather does
            k = k * k_scale
            v = v * v_scale
        k = k.to(tl.float64)
        v = v.to(tl.float64)
        s = tl.sum(q[:, None, :] * k[None, :, :], 2) * sm_scale  # [G, N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], 1)
        m_i = m_new

    # a length-0 row (a padded decode slot) has l_i == 0 and acc == 0: zeros, like the reference.
    # Stored as float32: the caller rounds to the output dtype in torch, as the reference does
    # (two roundings; compiled here, the two casts were folded into one and differed ~1 in 2^16)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + t * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(tl.float32), mask=g_mask[:, None])


def exact_rows_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    rows: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> torch.Tensor:
    """``q: [T, Hq, D]``: query ``t`` attends to the first ``lens[t]`` keys of table row ``rows[t]``.

    Arguments are checked by the public wrappers (`paged_decode_attention`,
    `paged_context_attention` with ``exact=True``), which build ``rows`` and ``lens``.
    """
    tokens, hq, head_dim = q.shape
    hkv = kv_layer.shape[2]
    out = torch.empty((tokens, hq, head_dim), dtype=torch.float32, device=q.device)
    if tokens == 0:
        return out.to(q.dtype)
    is_fp8 = kv_layer.dtype == torch.float8_e4m3fn
    ks = scale_or_one(k_scale, q.device) if is_fp8 else q
    vs = scale_or_one(v_scale, q.device) if is_fp8 else q
    group = hq // hkv
    # the softmax scale in float64 through memory: Triton passes a Python float as float32, and
    # that rounding moved every score by ~1e-8, enough to change 1 in 40000 bf16 outputs
    scale_t = torch.full((1,), float(scale), dtype=torch.float64, device=q.device)  # no host copy: graph-safe
    _exact_kernel[(tokens, hkv)](
        q, kv_layer, block_tables, rows, lens, ks, vs, out, scale_t,
        q.stride(0), q.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=next_pow2(group), HEAD_DIM=head_dim,
        PAGE=kv_layer.shape[3], BLOCK_N=_BLOCK_N, IS_FP8=is_fp8,
        num_warps=4, num_stages=1,
    )  # fmt: skip
    return out.to(q.dtype)


def context_rows(
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per new token: its sequence's index and the number of keys it sees (its position + 1).

    Built on the device without a host sync (``output_size`` is the known token count).
    """
    dev = seq_lens.device
    starts = query_start_loc.long()
    q_lens = starts[1:] - starts[:-1]
    seq_of_tok = torch.repeat_interleave(torch.arange(q_lens.shape[0], device=dev), q_lens, output_size=num_tokens)
    offset = torch.arange(num_tokens, device=dev) - starts[:-1][seq_of_tok]
    lens = seq_lens.long()[seq_of_tok] - q_lens[seq_of_tok] + offset + 1
    return seq_of_tok.to(torch.int32), lens.to(torch.int32)
