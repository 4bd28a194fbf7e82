"""The compiled kernels on a CUDA GPU against the torch reference (run on the lent GPU machine).

Same contract as the interpreter tests, at sizes the interpreter could not afford: long and
ragged contexts, many splits, every supported dtype, and decode captured in a CUDA graph.
Inputs are fresh per run (seeded from the clock; the seed is in the assertion message).
"""

from __future__ import annotations

import time

import pytest
import torch

from gpu_kernels import reference
from gpu_kernels import triton_ops as K
from gpu_kernels.testing import make_paged_batch, rel_err

pytestmark = pytest.mark.gpu

F32, BF16, F16, FP8 = torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn
SEED = time.time_ns() % 2**31


def tol(dtype: torch.dtype) -> float:
    # float32 dots run with input_precision="ieee" (no TF32), so float32 holds 1e-5 on the GPU too
    return 1e-5 if dtype == F32 else 1e-2


@pytest.fixture(autouse=True)
def poison_allocator():
    """Leave NaNs in the caching allocator's free memory, so an output element that a kernel
    forgets to write shows up as NaN instead of a plausible stale value."""
    junk = torch.full((64 << 20,), float("nan"), device="cuda")
    del junk
    yield


# (group, head_dim, page, q dtype, kv dtype): every group size, head_dim, dtype and a spread of
# page sizes, without the full cross product (each combination is a separate compilation)
DECODE_CASES = [
    (1, 64, 16, BF16, BF16),
    (3, 64, 16, F32, F32),
    (8, 128, 16, BF16, BF16),
    (8, 128, 32, F16, F16),
    (3, 128, 64, BF16, FP8),
    (1, 128, 128, F32, FP8),
    (8, 64, 128, F32, F32),
    (4, 256, 16, BF16, BF16),
    (3, 256, 32, F32, F32),
    (8, 128, 16, BF16, FP8),
]


@pytest.mark.parametrize("mb", [False, True, None])
@pytest.mark.parametrize(("group", "d", "page", "dt", "kv_dt"), DECODE_CASES)
def test_decode(group, d, page, dt, kv_dt, mb):
    lens = [1, page, page + 1, 2 * page - 1, 1000, 2049]
    pb = make_paged_batch(
        [1] * len(lens), lens, num_kv_heads=2, group=group, head_dim=d, page=page, dtype=dt, kv_dtype=kv_dt,
        device="cuda", seed=SEED,
    )  # fmt: skip
    args = (pb.q, pb.kv_layer, pb.block_tables, pb.seq_lens, pb.scale, pb.k_scale, pb.v_scale)
    out = K.paged_decode_attention(*args, multi_block=mb)
    ref = reference.paged_decode_attention(*args)
    assert rel_err(out, ref) <= tol(dt), f"seed {SEED}"


@pytest.mark.parametrize(("group", "d", "page", "dt", "kv_dt"), DECODE_CASES)
def test_context(group, d, page, dt, kv_dt):
    q_lens = [1, 300, 128, 77, 513]
    lens = [1, 300, 128 + page, 77 + 2 * page + 1, 1100]
    pb = make_paged_batch(
        q_lens, lens, num_kv_heads=2, group=group, head_dim=d, page=page, dtype=dt, kv_dtype=kv_dt,
        device="cuda", seed=SEED,
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
    assert rel_err(out, ref) <= tol(dt), f"seed {SEED}"


@pytest.mark.parametrize(
    ("group", "d", "page", "dt", "kv_dt"),
    [(4, 128, 16, BF16, BF16), (3, 64, 32, F16, F16), (8, 128, 16, BF16, FP8), (1, 128, 64, F32, F32)],
)
def test_context_long_chunks(group, d, page, dt, kv_dt):
    """Chunks over 1024 tokens take the large-tile configuration."""
    q_lens = [1500, 1025, 3]
    lens = [1500, 1025 + 7 * page + 1, 2000]
    pb = make_paged_batch(
        q_lens, lens, num_kv_heads=2, group=group, head_dim=d, page=page, dtype=dt, kv_dtype=kv_dt,
        device="cuda", seed=SEED,
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
    assert rel_err(out, reference.paged_context_attention(*args)) <= tol(dt), f"seed {SEED}"


def test_decode_in_cuda_graph():
    """Captured once, replayed after the batch's lengths and tables change (no host syncs inside)."""
    pb = make_paged_batch([1] * 4, [3000, 17, 1, 900], num_kv_heads=8, group=4, head_dim=128, page=16,
                          dtype=BF16, device="cuda", seed=SEED)  # fmt: skip
    args = (pb.q, pb.kv_layer, pb.block_tables, pb.seq_lens, pb.scale)
    for mb in (False, True):
        K.paged_decode_attention(*args, multi_block=mb)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = K.paged_decode_attention(*args, multi_block=mb)
        pb.seq_lens.copy_(torch.tensor([2999, 16, 1, 905], dtype=torch.int32))  # within each table
        pb.q.normal_()
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, reference.paged_decode_attention(*args)) <= 1e-2, f"seed {SEED}"


@pytest.mark.parametrize("dt", [F32, BF16, F16])
def test_small_ops(dt):
    g = torch.Generator(device="cuda").manual_seed(SEED)
    x = torch.randn(333, 4096, generator=g, device="cuda").to(dt)
    res = torch.randn(333, 4096, generator=g, device="cuda").to(dt)
    w = torch.randn(4096, generator=g, device="cuda").to(dt)
    out, new_res = K.rms_norm(x, w, 1e-5, res)
    ref, ref_res = reference.rms_norm(x, w, 1e-5, res)
    assert rel_err(out, ref) <= tol(dt) and torch.equal(new_res, ref_res)
    if dt != F32:  # float64 mean square on both sides: the same bits
        assert torch.equal(out, ref), f"seed {SEED}"

    gu = torch.randn(77, 2 * 14336, generator=g, device="cuda").to(dt)
    assert rel_err(K.silu_mul(gu), reference.silu_mul(gu)) <= tol(dt)

    t, hq, hkv, d, page = 300, 32, 8, 128, 16
    q = torch.randn(t, hq, d, generator=g, device="cuda").to(dt)
    k = torch.randn(t, hkv, d, generator=g, device="cuda").to(dt)
    v = torch.randn(t, hkv, d, generator=g, device="cuda").to(dt)
    pos = torch.randint(0, 100000, (t,), generator=g, device="cuda")
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    llama3["original_max_position_embeddings"] = 8192
    cache = reference.rope_cos_sin_cache(d, 100000, 500000.0, llama3).cuda()
    slots = torch.randperm(40 * page, generator=g, device="cuda")[:t]
    for kv_dt, scales in (
        (dt, (None, None)),
        (FP8, (torch.tensor(0.3, device="cuda"), torch.tensor(2.0, device="cuda"))),
    ):
        kv_a = torch.zeros(40, 2, hkv, page, d, dtype=kv_dt, device="cuda")
        kv_b = kv_a.clone()
        qa, ka = K.rope_and_write_kv(q, k, v, pos, cache, kv_a, slots, *scales)
        qb, kb = reference.rope_and_write_kv(q, k, v, pos, cache, kv_b, slots, *scales)
        # no FMA contraction in the kernel: the reference's roundings, the same bits
        assert torch.equal(qa, qb) and torch.equal(ka, kb), f"seed {SEED}"
        assert torch.equal(kv_a.view(torch.uint8), kv_b.view(torch.uint8)), f"seed {SEED}"
        kv_a.view(torch.uint8).zero_()
        kv_b.view(torch.uint8).zero_()
        K.write_kv(k, v, kv_a, slots, *scales)
        reference.write_kv(k, v, kv_b, slots, *scales)
        assert torch.equal(kv_a.view(torch.uint8), kv_b.view(torch.uint8))

    xq = torch.randn(1 << 20, generator=g, device="cuda").to(dt) * 100
    s = torch.tensor(0.21, device="cuda")
    assert torch.equal(
        K.fp8_quantize(xq, s).view(torch.uint8), reference.fp8_quantize(xq, s).view(torch.uint8)
    )


@pytest.mark.parametrize("mb", [False, True])
def test_bf16_attention_rounds_like_reference(mb):
    """With split probabilities (`gpu_kernels.pv_product`) bf16 outputs equal the reference's own
    bf16 rounding almost everywhere, compiled as under the interpreter."""
    q_lens, lens = [1, 700, 1500, 64], [3000, 700, 1500, 2100]
    pb = make_paged_batch(q_lens, lens, num_kv_heads=8, group=4, head_dim=128, page=16, dtype=BF16,
                          device="cuda", seed=SEED)  # fmt: skip
    q = pb.q * 4  # sharper softmax than unit-variance q gives: larger probabilities to round
    args = (q, pb.kv_layer, pb.block_tables, pb.query_start_loc, pb.seq_lens, pb.scale)
    out = K.paged_context_attention(*args, max_query_len=max(q_lens), split_probs=True)
    assert (out != reference.paged_context_attention(*args)).float().mean().item() < 0.01, f"seed {SEED}"
    last = pb.query_start_loc[1:] - 1  # each sequence's last token, as a decode batch
    dargs = (q[last.long()], pb.kv_layer, pb.block_tables, pb.seq_lens, pb.scale)
    out = K.paged_decode_attention(*dargs, multi_block=mb, split_probs=True)
    assert (out != reference.paged_decode_attention(*dargs)).float().mean().item() < 0.01, f"seed {SEED}"


@pytest.mark.parametrize(("group", "dt", "kv_dt"), [(4, BF16, BF16), (3, BF16, BF16), (8, F16, F16), (4, BF16, FP8)])
def test_exact_attention_is_bit_identical(group, dt, kv_dt):
    """Exact numerics (`gpu_kernels.exact_attention`): the reference's bits, prefill and decode."""
    q_lens, lens = [1, 300, 517, 64, 1], [2049, 300, 1500, 900, 16]
    pb = make_paged_batch(q_lens, lens, num_kv_heads=2, group=group, head_dim=128, page=16, dtype=dt,
                          kv_dtype=kv_dt, device="cuda", seed=SEED)  # fmt: skip
    q = pb.q * 4  # a sharp softmax: large probabilities, the hardest to round alike
    args = (q, pb.kv_layer, pb.block_tables, pb.query_start_loc, pb.seq_lens, pb.scale, pb.k_scale, pb.v_scale)
    out = K.paged_context_attention(*args, max_query_len=max(q_lens), exact=True)
    ref = reference.paged_context_attention(*args)
    assert torch.equal(out, ref), f"seed {SEED}: {(out != ref).sum().item()} of {out.numel()} differ"
    last = (pb.query_start_loc[1:] - 1).long()
    dargs = (q[last], pb.kv_layer, pb.block_tables, pb.seq_lens, pb.scale, pb.k_scale, pb.v_scale)
    out = K.paged_decode_attention(*dargs, exact=True)
    ref = reference.paged_decode_attention(*dargs)
    assert torch.equal(out, ref), f"seed {SEED}: {(out != ref).sum().item()} of {out.numel()} differ"
