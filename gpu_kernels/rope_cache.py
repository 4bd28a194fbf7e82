"""RoPE fused with the paged KV-cache write (and the plain cache write).

After the QKV projection, unfused code reads K three times (rotate, cast, scatter) and Q
twice. Here one program per token reads its q, k, v rows and cos/sin once, writes rotated q
and k, and scatters rotated k and v into the token's cache slot (quantising to FP8 when the
pool is FP8). Rotation is neox-style over a ``[max_pos, D]`` float32 cos|sin cache, so any
RoPE scaling (llama3 included) lives in how that cache was built, not here.

Slots below 0 are skipped: that is how padded tokens of a CUDA-graph batch say "no slot".
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_kernels import interpreter_compat
from gpu_kernels.checks import (
    FLOAT_DTYPES,
    FP8_DTYPE,
    INDEX_DTYPES,
    check_kv_layer,
    check_scale,
    check_shape,
    check_tensor,
    ensure_runnable,
    next_pow2,
    scale_or_one,
)
from gpu_kernels.quant import quantize_e4m3

interpreter_compat.apply()


@triton.jit
def _rotate(x_ptr, out_ptr, stride_xh, stride_oh, cos, sin, NUM_HEADS: tl.constexpr,
            HEADS_PAD: tl.constexpr, HALF: tl.constexpr):  # fmt: skip
    """Rotate one token's ``[H, D]`` rows; returns the rotated halves rounded to x's dtype."""
    offs_h = tl.arange(0, HEADS_PAD)
    offs = tl.arange(0, HALF)
    h_mask = offs_h[:, None] < NUM_HEADS
    ptrs = x_ptr + offs_h[:, None] * stride_xh + offs[None, :]
    x1 = tl.load(ptrs, mask=h_mask, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=h_mask, other=0.0)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    o1 = (a * cos[None, :] - b * sin[None, :]).to(x1.dtype)
    o2 = (b * cos[None, :] + a * sin[None, :]).to(x1.dtype)
    o_ptrs = out_ptr + offs_h[:, None] * stride_oh + offs[None, :]
    tl.store(o_ptrs, o1, mask=h_mask)
    tl.store(o_ptrs + HALF, o2, mask=h_mask)
    return o1, o2


@triton.jit
def _store_kv_half(dst, x, scale_ptr, mask, IS_FP8: tl.constexpr):
    if IS_FP8:
        tl.store(dst, quantize_e4m3(x.to(tl.float32), tl.load(scale_ptr)), mask=mask)
    else:
        tl.store(dst, x.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rope_write_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, kv_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
    q_out_ptr, k_out_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_kv_blk, stride_kv_kv, stride_kv_h, stride_kv_slot,
    HQ: tl.constexpr, HQ_PAD: tl.constexpr, HKV: tl.constexpr, HKV_PAD: tl.constexpr,
    HALF: tl.constexpr, PAGE: tl.constexpr, HAS_ROPE: tl.constexpr, IS_FP8: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, HALF)
    offs_h = tl.arange(0, HKV_PAD)
    h_mask = offs_h[:, None] < HKV
    if HAS_ROPE:
        pos = tl.load(pos_ptr + t).to(tl.int64)
        cos = tl.load(cs_ptr + pos * stride_cs + offs)
        sin = tl.load(cs_ptr + pos * stride_cs + HALF + offs)
        _rotate(q_ptr + t * stride_qt, q_out_ptr + t * stride_qot, stride_qh, stride_qoh, cos, sin,
                HQ, HQ_PAD, HALF)  # fmt: skip
        k1, k2 = _rotate(k_ptr + t * stride_kt, k_out_ptr + t * stride_kot, stride_kh, stride_koh, cos, sin,
                         HKV, HKV_PAD, HALF)  # fmt: skip
    else:
        k_ptrs = k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs[None, :]
        k1 = tl.load(k_ptrs, mask=h_mask, other=0.0)
        k2 = tl.load(k_ptrs + HALF, mask=h_mask, other=0.0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        v_ptrs = v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs[None, :]
        v1 = tl.load(v_ptrs, mask=h_mask, other=0.0)
        v2 = tl.load(v_ptrs + HALF, mask=h_mask, other=0.0)
        base = kv_ptr + (slot // PAGE) * stride_kv_blk + (slot % PAGE) * stride_kv_slot
        k_dst = base + offs_h[:, None] * stride_kv_h + offs[None, :]
        v_dst = k_dst + stride_kv_kv
        _store_kv_half(k_dst, k1, k_scale_ptr, h_mask, IS_FP8)
        _store_kv_half(k_dst + HALF, k2, k_scale_ptr, h_mask, IS_FP8)
        _store_kv_half(v_dst, v1, v_scale_ptr, h_mask, IS_FP8)
        _store_kv_half(v_dst + HALF, v2, v_scale_ptr, h_mask, IS_FP8)


def _check_kv_inputs(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> tuple[int, int, torch.Tensor | None, torch.Tensor | None]:
    """Checks shared by both entry points; returns ``(tokens, kv heads, k_scale, v_scale)``."""
    check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES)
    ensure_runnable(k)
    dev = k.device
    _, hkv, _, head_dim = check_kv_layer(kv_layer, dev)
    check_shape("k", k, (k.shape[0], hkv, head_dim))
    check_tensor("v", v, ndim=3, dtypes=(k.dtype,), device=dev)
    check_shape("v", v, tuple(k.shape))
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES, device=dev)
    check_shape("slot_mapping", slot_mapping, (k.shape[0],))
    return k.shape[0], hkv, check_scale("k_scale", k_scale, dev), check_scale("v_scale", v_scale, dev)


def _launch(q, k, v, positions, cos_sin_cache, kv_layer, slot_mapping, k_scale, v_scale, q_out, k_out,
            has_rope: bool) -> None:  # fmt: skip
    tokens, hkv = k.shape[0], k.shape[1]
    hq = q.shape[1]
    is_fp8 = kv_layer.dtype == FP8_DTYPE
    ks = scale_or_one(k_scale, k.device) if is_fp8 else k
    vs = scale_or_one(v_scale, k.device) if is_fp8 else k
    _rope_write_kernel[(tokens,)](
        q, k, v, positions, cos_sin_cache, kv_layer, slot_mapping, ks, vs,
        q_out, k_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        HQ=hq, HQ_PAD=next_pow2(hq), HKV=hkv, HKV_PAD=next_pow2(hkv),
        HALF=k.shape[2] // 2, PAGE=kv_layer.shape[3], HAS_ROPE=has_rope, IS_FP8=is_fp8,
        num_warps=4,
        # no fused multiply-add: the reference rounds x*cos and y*sin before adding; fused, a
        # quarter of the float32 results differed on H200, and some of that survives bf16 rounding
        enable_fp_fusion=False,
    )  # fmt: skip


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Scatter ``k, v: [T, Hkv, D]`` into their cache slots (``block * block_size + offset``)."""
    tokens, _, k_scale, v_scale = _check_kv_inputs(k, v, kv_layer, slot_mapping, k_scale, v_scale)
    if tokens:
        _launch(k, k, v, slot_mapping, k, kv_layer, slot_mapping, k_scale, v_scale, k, k, has_rope=False)


def rope_and_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_layer: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q: [T, Hq, D]`` and ``k``, write rotated ``k`` and ``v`` to the cache; return ``(q, k)``."""
    tokens, _, k_scale, v_scale = _check_kv_inputs(k, v, kv_layer, slot_mapping, k_scale, v_scale)
    check_tensor("q", q, ndim=3, dtypes=(k.dtype,), device=k.device)
    if q.shape[0] != tokens or q.shape[2] != k.shape[2]:
        raise ValueError(f"q: shape {tuple(q.shape)} does not match k {tuple(k.shape)} in tokens/head_dim")
    check_tensor("positions", positions, ndim=1, dtypes=INDEX_DTYPES, device=k.device)
    check_shape("positions", positions, (tokens,))
    check_tensor("cos_sin_cache", cos_sin_cache, ndim=2, dtypes=(torch.float32,), device=k.device)
    if cos_sin_cache.shape[1] != k.shape[2]:
        raise ValueError(f"cos_sin_cache: expected [max_pos, {k.shape[2]}], got {tuple(cos_sin_cache.shape)}")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if tokens:
        _launch(q, k, v, positions, cos_sin_cache, kv_layer, slot_mapping, k_scale, v_scale, q_out, k_out,
                has_rope=True)  # fmt: skip
    return q_out, k_out
