"""Paged context (prefill) attention (Triton, interpreted on CPU) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from gpu_kernels import reference
from gpu_kernels import triton_ops as K
from gpu_kernels.testing import case_seed, make_paged_batch, rel_err

F32, BF16, F16, FP8 = torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn


def tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == F32 else 1e-2


# (group, kv_heads, head_dim, page, q dtype, kv dtype, q_lens, seq_lens)
CASES = [
    # fresh prompts, ragged, one a single token, one on a page boundary
    (1, 2, 64, 16, F32, F32, [1, 17, 32], [1, 17, 32]),
    # chunked prefill / prefix-cache hits: prefixes on and just past page boundaries
    (3, 2, 64, 16, F32, F32, [16, 5, 1, 20], [48, 37, 17, 36]),
    (8, 1, 128, 32, F32, F32, [33, 7], [65, 39]),
    (8, 1, 128, 32, BF16, BF16, [40, 1], [72, 33]),
    (3, 1, 64, 128, F16, F16, [19, 34], [147, 34]),
    (3, 2, 64, 16, F32, FP8, [17, 2], [33, 18]),
    (1, 2, 128, 64, BF16, FP8, [21, 9], [64, 73]),
]


@pytest.mark.parametrize(("group", "hkv", "d", "page", "dt", "kv_dt", "q_lens", "lens"), CASES)
def test_context_matches_reference(group, hkv, d, page, dt, kv_dt, q_lens, lens):
    pb = make_paged_batch(
        q_lens, lens, num_kv_heads=hkv, group=group, head_dim=d, page=page, dtype=dt, kv_dtype=kv_dt,
        seed=case_seed(group, hkv, d, page, dt, kv_dt, q_lens, lens),
    )  # fmt: skip
    args = (
        pb.q,
        pb.kv_layer,
        pb.block_tables,
        pb.query_start_loc,
        pb.seq_lens,
        pb.scale,
        pb.k_scale,
        pb.v_scale,
    )
    out = K.paged_context_attention(*args, max_query_len=max(q_lens))
    ref = reference.paged_context_attention(*args)
    assert out.shape == ref.shape and out.dtype == dt
    assert rel_err(out, ref) <= tol(dt)


def test_tile_shapes_and_grid_size_do_not_change_result():
    """Query tiles that straddle pages and chunk ends, and a grid sized from query_start_loc."""
    pb = make_paged_batch([30, 3], [50, 3], num_kv_heads=1, group=3, head_dim=64, page=64, dtype=F32, seed=5)
    args = (pb.q, pb.kv_layer, pb.block_tables, pb.query_start_loc, pb.seq_lens, pb.scale)
    ref = reference.paged_context_attention(*args)
    # odd shapes, then the GPU defaults for short and long chunks (see default_context_config)
    configs = [K.ContextConfig(32, 16, 4, 1), K.ContextConfig(16, 32, 4, 1)]
    configs += [K.ContextConfig(64, 32, 4, 4), K.ContextConfig(256, 64, 8, 3)]
    for cfg in configs:
        assert rel_err(K.paged_context_attention(*args, config=cfg), ref) <= 1e-5
    assert rel_err(K.paged_context_attention(*args), ref) <= 1e-5  # max_query_len read from qsl


def test_empty_chunk_in_batch():
    """A sequence with no new tokens this step contributes no rows and disturbs no one."""
    pb = make_paged_batch(
        [5, 0, 4], [21, 16, 4], num_kv_heads=2, group=1, head_dim=64, page=16, dtype=F32, seed=9
    )
    args = (pb.q, pb.kv_layer, pb.block_tables, pb.query_start_loc, pb.seq_lens, pb.scale)
    out = K.paged_context_attention(*args, max_query_len=5)
    assert out.shape[0] == 9
    assert rel_err(out, reference.paged_context_attention(*args)) <= 1e-5


def test_decode_and_context_agree_on_one_token_queries():
    """A one-token chunk is a decode step: both kernels must give the same answer."""
    pb = make_paged_batch(
        [1, 1, 1], [1, 49, 16], num_kv_heads=2, group=3, head_dim=64, page=16, dtype=F32, seed=13
    )
    ctx = K.paged_context_attention(
        pb.q, pb.kv_layer, pb.block_tables, pb.query_start_loc, pb.seq_lens, pb.scale, max_query_len=1
    )
    dec = K.paged_decode_attention(
        pb.q, pb.kv_layer, pb.block_tables, pb.seq_lens, pb.scale, multi_block=True
    )
    assert rel_err(ctx, dec) <= 1e-5


def test_bf16_rounds_like_reference():
    """With split probabilities (`gpu_kernels.pv_product`) bf16 outputs equal the reference's
    bf16 rounding almost everywhere; rounded before P·V (the default) a fifth differ."""
    pb = make_paged_batch(
        [20, 25, 15], [150, 77, 190], num_kv_heads=3, group=3, head_dim=64, page=16, dtype=BF16, seed=12
    )
    args = (pb.q * 3, pb.kv_layer, pb.block_tables, pb.query_start_loc, pb.seq_lens, pb.scale)
    ref = reference.paged_context_attention(*args)
    split = K.paged_context_attention(*args, split_probs=True)
    rounded = K.paged_context_attention(*args)  # the default
    assert (split != ref).float().mean().item() < 0.01
    assert (rounded != ref).float().mean().item() > 0.05
