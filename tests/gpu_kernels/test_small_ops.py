"""Fused small ops (Triton, interpreted on CPU) against the torch reference.

These kernels mirror the reference's rounding step by step, so most comparisons are exact.
"""

from __future__ import annotations

import pytest
import torch

from gpu_kernels import reference
from gpu_kernels import triton_ops as K
from gpu_kernels.testing import case_seed, rel_err

F32, BF16, F16, FP8 = torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == F32 else 1e-2


def gen(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(case_seed(*parts))


@pytest.mark.parametrize(
    ("shape", "dt", "w_dt", "with_residual"),
    [
        ((1, 64), F32, F32, False),
        ((7, 576), F32, F32, True),
        ((3, 5, 128), BF16, BF16, True),
        ((4, 300), BF16, F32, False),  # fp32 weight promotes the output, as in the reference
        ((2, 1024), F16, F16, True),
    ],
)
def test_rms_norm(shape, dt, w_dt, with_residual):
    g = gen("rms", shape, dt, w_dt, with_residual)
    x = torch.randn(shape, generator=g).to(dt)
    res = torch.randn(shape, generator=g).to(dt) if with_residual else None
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(w_dt)
    out, new_res = K.rms_norm(x, w, 1e-6, res)
    ref, ref_res = reference.rms_norm(x, w, 1e-6, res)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert rel_err(out, ref) <= tol(dt)
    if dt != F32:  # 16-bit: float64 mean square and IEEE sqrt/div on both sides, the same bits
        assert torch.equal(out, ref)
    if with_residual:
        assert torch.equal(new_res, ref_res)
    else:
        assert new_res is None


@pytest.mark.parametrize(("shape", "dt"), [((5, 3000), F32), ((1, 128), BF16), ((2, 3, 2048), F16)])
def test_silu_mul(shape, dt):
    x = (2 * torch.randn(shape, generator=gen("silu", shape, dt))).to(dt)
    out = K.silu_mul(x)
    ref = reference.silu_mul(x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= tol(dt)


@pytest.mark.parametrize(
    ("hq", "hkv", "d", "page", "dt", "kv_dt", "scaling"),
    [
        (9, 3, 64, 16, F32, F32, None),  # SmolLM2's heads
        (8, 8, 128, 32, BF16, BF16, LLAMA3_SCALING),
        (16, 2, 64, 16, BF16, FP8, LLAMA3_SCALING),
        (4, 1, 128, 64, F32, FP8, None),
    ],
)
def test_rope_and_write_kv(hq, hkv, d, page, dt, kv_dt, scaling):
    g = gen("rope", hq, hkv, d, page, dt, kv_dt, scaling is None)
    tokens, num_blocks = 11, 4
    # q, k, v as views of one fused projection output, like the model produces them
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=g).to(dt)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(tokens, hq, d), k.view(tokens, hkv, d), v.view(tokens, hkv, d)
    positions = torch.randint(0, 9000, (tokens,), generator=g)
    cache = reference.rope_cos_sin_cache(d, 9000, 500000.0, scaling)
    slots = torch.randperm(num_blocks * page, generator=g)[:tokens]
    slots[4] = -1  # a padded token: writes nothing
    scales = (torch.tensor(0.4), torch.tensor(1.7)) if kv_dt == FP8 else (None, None)
    kv0 = torch.randn(num_blocks, 2, hkv, page, d, generator=g).to(kv_dt)
    kv_out, kv_ref = kv0.clone(), kv0.clone()
    q_out, k_out = K.rope_and_write_kv(q, k, v, positions, cache, kv_out, slots, *scales)
    q_ref, k_ref = reference.rope_and_write_kv(q, k, v, positions, cache, kv_ref, slots, *scales)
    # the reference's roundings (no fused multiply-add): the same bits, in the pool too
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    assert torch.equal(kv_out.view(torch.uint8), kv_ref.view(torch.uint8))
    # untouched slots (the padded token's too) unchanged
    untouched = torch.ones(num_blocks * page, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    flat = kv_out.view(torch.uint8).permute(0, 3, 1, 2, 4).reshape(num_blocks * page, -1)
    flat0 = kv0.view(torch.uint8).permute(0, 3, 1, 2, 4).reshape(num_blocks * page, -1)
    assert torch.equal(flat[untouched], flat0[untouched])


@pytest.mark.parametrize(("dt", "kv_dt"), [(F32, F32), (BF16, BF16), (F16, FP8), (BF16, FP8)])
def test_write_kv_is_exact(dt, kv_dt):
    g = gen("write", dt, kv_dt)
    hkv, d, page, blocks, tokens = 2, 64, 16, 3, 20
    k = torch.randn(tokens, hkv, d, generator=g).to(dt)
    v = torch.randn(tokens, hkv, d, generator=g).to(dt)
    slots = torch.randperm(blocks * page, generator=g)[:tokens]
    scales = (torch.tensor(0.3), torch.tensor(0.9)) if kv_dt == FP8 else (None, None)
    kv0 = torch.randn(blocks, 2, hkv, page, d, generator=g).to(kv_dt)
    kv_out, kv_ref = kv0.clone(), kv0.clone()
    K.write_kv(k, v, kv_out, slots, *scales)
    reference.write_kv(k, v, kv_ref, slots, *scales)
    assert torch.equal(kv_out.view(torch.uint8), kv_ref.view(torch.uint8))


@pytest.mark.parametrize("dt", [F32, BF16, F16])
def test_fp8_quantize_is_bit_exact(dt):
    g = gen("fp8", dt)
    # magnitudes from fp8-subnormal to overflow (clamped to 448), both signs, and signed zeros
    x = torch.randn(6000, generator=g) * torch.logspace(-6, 4, 6000)
    x[:4] = torch.tensor([0.0, -0.0, 1e6, -1e6])
    x = x.to(dt)
    scale = torch.tensor(0.37)
    out = K.fp8_quantize(x, scale)
    ref = reference.fp8_quantize(x, scale)
    assert out.dtype == FP8
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))
