"""Paged decode attention (Triton, interpreted on CPU) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from gpu_kernels import reference
from gpu_kernels import triton_ops as K
from gpu_kernels.checks import CPU_ASSUMED_SM_COUNT
from gpu_kernels.decode_attention import MIN_TOKENS_PER_SPLIT, decode_num_splits
from gpu_kernels.testing import case_seed, make_paged_batch, rel_err

F32, BF16, F16, FP8 = torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn


def tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == F32 else 1e-2


# (group, kv_heads, head_dim, page, q dtype, kv dtype, multi_block, seq_lens, block_n)
CASES = [
    (1, 2, 64, 16, F32, F32, False, [1, 16, 17, 33], None),
    (1, 2, 64, 16, F32, F32, True, [1, 16, 17, 33], None),
    (3, 2, 64, 16, F32, F32, True, [16, 1, 47, 32], None),
    (3, 1, 64, 32, F32, F32, None, [96, 2], 16),  # pages of 2 tiles
    (8, 1, 128, 32, F32, F32, True, [64, 65, 3], None),
    (8, 2, 128, 32, F32, F32, False, [64, 65, 3], None),
    (3, 2, 64, 128, BF16, BF16, None, [129, 128, 5], None),  # page > tile
    (1, 3, 128, 16, F16, F16, True, [31, 32, 33], None),
    (8, 1, 64, 16, BF16, BF16, True, [80, 1], 64),  # tiles of 4 pages
    (3, 2, 64, 16, F32, FP8, True, [40, 1, 17], None),
    (8, 1, 128, 64, BF16, FP8, False, [65, 128], None),
    (4, 1, 256, 16, BF16, BF16, True, [33, 16], None),
]


@pytest.mark.parametrize(("group", "hkv", "d", "page", "dt", "kv_dt", "mb", "lens", "block_n"), CASES)
def test_decode_matches_reference(group, hkv, d, page, dt, kv_dt, mb, lens, block_n):
    seed = case_seed(group, hkv, d, page, dt, kv_dt, mb, lens)
    pb = make_paged_batch(
        [1] * len(lens), lens, num_kv_heads=hkv, group=group, head_dim=d, page=page, dtype=dt,
        kv_dtype=kv_dt, seed=seed,
    )  # fmt: skip
    args = (pb.q, pb.kv_layer, pb.block_tables, pb.seq_lens, pb.scale, pb.k_scale, pb.v_scale)
    out = K.paged_decode_attention(*args, multi_block=mb, block_n=block_n)
    ref = reference.paged_decode_attention(*args)
    assert out.shape == ref.shape and out.dtype == dt
    assert rel_err(out, ref) <= tol(dt)


def test_split_count_does_not_change_result():
    """1, 2, 5 and more splits than tiles (empty splits) merge to the same answer."""
    pb = make_paged_batch(
        [1, 1, 1], [70, 1, 33], num_kv_heads=2, group=3, head_dim=64, page=16, dtype=F32, seed=7
    )
    args = (pb.q, pb.kv_layer, pb.block_tables, pb.seq_lens, pb.scale)
    ref = reference.paged_decode_attention(*args)
    outs = [K.paged_decode_attention(*args, num_splits=s, block_n=16) for s in (1, 2, 5, 9)]
    for out in outs:
        assert rel_err(out, ref) <= 1e-5
    assert rel_err(outs[0], outs[2]) <= 1e-6


def test_empty_sequence_gives_zeros_like_reference():
    """A padded batch slot (seq_len 0) must not produce NaN, single- or multi-block."""
    pb = make_paged_batch([1, 1], [5, 5], num_kv_heads=1, group=3, head_dim=64, page=16, dtype=F32, seed=3)
    pb.seq_lens[1] = 0
    args = (pb.q, pb.kv_layer, pb.block_tables, pb.seq_lens, pb.scale)
    ref = reference.paged_decode_attention(*args)
    for mb in (False, True):
        out = K.paged_decode_attention(*args, multi_block=mb)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert rel_err(out, ref) <= 1e-5


def test_strided_q_view():
    """q sliced out of a fused projection (non-contiguous batch stride) is read correctly."""
    pb = make_paged_batch([1, 1], [20, 9], num_kv_heads=2, group=3, head_dim=64, page=16, dtype=F32, seed=11)
    big = torch.randn(2, 10, 64)
    big[:, 2:8] = pb.q
    q = big[:, 2:8]
    args = (pb.kv_layer, pb.block_tables, pb.seq_lens, pb.scale)
    assert rel_err(K.paged_decode_attention(q, *args), reference.paged_decode_attention(pb.q, *args)) <= 1e-5


def test_split_heuristic():
    sms = CPU_ASSUMED_SM_COUNT
    # batch x kv heads already fill the SMs: no split unless forced
    assert decode_num_splits(256, 8, 32768, sms) == 1
    assert decode_num_splits(256, 8, 32768, sms, multi_block=True) >= 2
    # one long sequence: split into many, each at least MIN_TOKENS_PER_SPLIT long
    s = decode_num_splits(1, 8, 32768, sms)
    assert s >= 16 and 32768 / s >= MIN_TOKENS_PER_SPLIT
    # short sequences are not worth splitting
    assert decode_num_splits(1, 8, 200, sms) == 1
    assert decode_num_splits(1, 8, 200, sms, multi_block=True) == 2
    assert decode_num_splits(1, 8, 32768, sms, multi_block=False) == 1
    # fewer SMs -> fewer splits
    assert decode_num_splits(1, 8, 32768, 16) < s


def test_fp8_compute_dtype_override():
    """FP8 KV widened to fp16 (default for bf16 q) or bf16 (override): both match the reference."""
    pb = make_paged_batch(
        [1, 1], [40, 9], num_kv_heads=1, group=8, head_dim=64, page=16, dtype=BF16, kv_dtype=FP8, seed=17
    )
    args = (pb.q, pb.kv_layer, pb.block_tables, pb.seq_lens, pb.scale, pb.k_scale, pb.v_scale)
    ref = reference.paged_decode_attention(*args)
    for dot in (None, BF16, F32):
        assert rel_err(K.paged_decode_attention(*args, fp8_compute_dtype=dot), ref) <= 1e-2
    with pytest.raises(ValueError, match=r"^fp8_compute_dtype"):
        K.paged_decode_attention(*args, fp8_compute_dtype=torch.int8)


@pytest.mark.parametrize("mb", [False, True])
def test_bf16_rounds_like_reference(mb):
    """With split probabilities bf16 outputs equal the reference's bf16 rounding almost
    everywhere; rounded to bf16 before P·V (the default, like flash kernels) a fifth differ."""
    pb = make_paged_batch(
        [1, 1, 1], [150, 77, 190], num_kv_heads=3, group=3, head_dim=64, page=16, dtype=BF16, seed=11
    )
    args = (pb.q * 3, pb.kv_layer, pb.block_tables, pb.seq_lens, pb.scale)
    ref = reference.paged_decode_attention(*args)
    split = K.paged_decode_attention(*args, multi_block=mb, split_probs=True)
    rounded = K.paged_decode_attention(*args, multi_block=mb)  # the default
    assert (split != ref).float().mean().item() < 0.01
    assert (rounded != ref).float().mean().item() > 0.05
