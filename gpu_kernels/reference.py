"""Plain-torch reference twins of every kernel.

These define the semantics the Triton kernels must match, and they are what CPU runs use.
Shapes follow the KV layout of `engine.kv_cache_pool` (``kv_layer``:
``[num_blocks, 2, num_kv_heads, block_size, head_dim]``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

FP8_E4M3_MAX = 448.0


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x (+ residual)`` normalised; returns ``(out, new_residual)`` (new_residual is None without one).

    Computed in float32 and cast back, like HF's LlamaRMSNorm, so float32 runs match it exactly.
    For 16-bit inputs the mean square is summed in float64 (squares of 16-bit values are exact
    there, so the summation order no longer shows after rounding) and ``1/sqrt`` uses IEEE
    sqrt and division, which the kernel repeats: both get the same scale bit for bit. (With a
    float32 sum, the order alone moved the scale by an ulp, enough to change a bf16 model's
    greedy tokens.) ``eps`` is added as the float32 value it is everywhere else.
    """
    if residual is not None:
        x = x + residual
        residual = x
    h = x.to(torch.float32)
    if x.dtype == torch.float32:
        inv = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    else:
        h64 = h.to(torch.float64)
        eps32 = float(torch.tensor(eps, dtype=torch.float32))
        inv = (1.0 / torch.sqrt((h64 * h64).sum(-1, keepdim=True) / x.shape[-1] + eps32)).to(torch.float32)
    h = h * inv
    return weight * h.to(x.dtype), residual


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """``x: [T, 2I]`` (gate | up) -> ``silu(gate) * up: [T, I]``."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies, with Llama 3's frequency-dependent scaling when asked for."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin_cache(
    head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None = None
) -> torch.Tensor:
    """``[max_positions, head_dim]`` float32: ``cos`` in the first half, ``sin`` in the second."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """Neox-style (rotate-half) rotary embedding of ``x: [T, H, D]`` at ``positions: [T]``."""
    half = x.shape[-1] // 2
    cs = cos_sin_cache[positions]  # [T, D]
    cos = torch.cat([cs[:, :half], cs[:, :half]], dim=-1)[:, None, :]
    sin = torch.cat([cs[:, half:], cs[:, half:]], dim=-1)[:, None, :]
    xf = x.to(torch.float32)
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor e4m3 quantisation: ``clamp(x / scale)`` cast to ``float8_e4m3fn``."""
    return (x.to(torch.float32) / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Scatter ``k, v: [T, Hkv, D]`` into their slots (``block * block_size + offset``)."""
    block_size = kv_layer.shape[3]
    # a negative slot marks a padded token (CUDA-graph batches): it owns no slot, write nothing
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    blocks = torch.div(slot_mapping, block_size, rounding_mode="floor")
    offsets = slot_mapping % block_size
    if kv_layer.dtype == torch.float8_e4m3fn:
        k = fp8_quantize(k, k_scale if k_scale is not None else torch.tensor(1.0))
        v = fp8_quantize(v, v_scale if v_scale is not None else torch.tensor(1.0))
    # kv_layer[blocks, 0, :, offsets] has shape [T, Hkv, D]
    kv_layer[blocks, 0, :, offsets] = k.to(kv_layer.dtype)
    kv_layer[blocks, 1, :, offsets] = v.to(kv_layer.dtype)


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
    """Rotate ``q, k`` and write the rotated ``k`` and ``v`` into the paged cache; returns ``(q, k)``."""
    q = apply_rope(q, positions, cos_sin_cache)
    k = apply_rope(k, positions, cos_sin_cache)
    write_kv(k, v, kv_layer, slot_mapping, k_scale, v_scale)
    return q, k


def gather_kv(
    kv_layer: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's ``K, V: [Hkv, seq_len, D]`` from its blocks (FP8 dequantised)."""
    block_size = kv_layer.shape[3]
    nb = (seq_len + block_size - 1) // block_size
    blocks = kv_layer[block_table[:nb].long()]  # [nb, 2, H, bs, D]
    h, d = blocks.shape[2], blocks.shape[4]
    k = blocks[:, 0].permute(1, 0, 2, 3).reshape(h, nb * block_size, d)[:, :seq_len]
    v = blocks[:, 1].permute(1, 0, 2, 3).reshape(h, nb * block_size, d)[:, :seq_len]
    if kv_layer.dtype == torch.float8_e4m3fn:
        out = dtype or torch.float32
        k = (k.to(torch.float32) * (k_scale if k_scale is not None else 1.0)).to(out)
        v = (v.to(torch.float32) * (v_scale if v_scale is not None else 1.0)).to(out)
    elif dtype is not None:
        k, v = k.to(dtype), v.to(dtype)
    return k, v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``q: [L, Hq, D]`` against ``k, v: [Hkv, S, D]``, causal with the queries at the end.

    16-bit queries are attended in float64 and rounded once (through float32, as every cast to
    them goes): the correctly rounded result in all but ~1e-12 of elements, so a kernel is held
    to the true value, and the exact-numerics kernels reproduce it bit for bit. float32 queries
    stay in float32, which keeps float32 runs identical to Hugging Face's.
    """
    n_q, hq, _ = q.shape
    hkv, s, _ = k.shape
    group = hq // hkv
    acc = torch.float32 if q.dtype == torch.float32 else torch.float64
    qh = q.transpose(0, 1).reshape(hkv, group * n_q, -1)  # [Hkv, G*L, D]
    scores = torch.matmul(qh.to(acc), k.to(acc).transpose(1, 2)) * scale  # [Hkv, G*L, S]
    qpos = (torch.arange(n_q, device=q.device) + (s - n_q)).repeat(group)  # position of each query row
    mask = torch.arange(s, device=q.device)[None, :] > qpos[:, None]
    scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v.to(acc))  # [Hkv, G*L, D]
    return out.float().reshape(hq, n_q, -1).transpose(0, 1).to(q.dtype)


def paged_context_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Varlen causal attention of new tokens ``q: [T, Hq, D]`` over each sequence's paged KV.

    The new tokens' KV must already be in the cache. Query ``i`` of sequence ``b`` sits at
    position ``seq_lens[b] - q_len[b] + i`` and attends to positions ``<=`` its own.
    """
    out = torch.empty_like(q)
    qsl = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        lo, hi = qsl[b], qsl[b + 1]
        if hi == lo:
            continue
        k, v = gather_kv(kv_layer, block_tables[b], seq_len, k_scale, v_scale)
        out[lo:hi] = _attend(q[lo:hi], k, v, scale)
    return out


def paged_decode_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new query token per sequence: ``q: [B, Hq, D]`` -> ``[B, Hq, D]``."""
    qsl = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    return paged_context_attention(q, kv_layer, block_tables, qsl, seq_lens, scale, k_scale, v_scale)
