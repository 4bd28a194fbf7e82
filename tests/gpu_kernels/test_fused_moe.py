"""The fused-MoE Triton kernel (interpreted on CPU) against its torch twin, and the twin against a naive loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.layers.moe import route
from gpu_kernels import moe_reference, ops
from gpu_kernels import triton_ops as K
from gpu_kernels.fused_moe import MoETiles
from gpu_kernels.testing import case_seed, rel_err

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def moe_case(tokens: int, hidden: int, inter: int, experts: int, top_k: int, dtype: torch.dtype, device="cpu"):
    g = torch.Generator().manual_seed(case_seed("moe", tokens, hidden, inter, experts, top_k, dtype))
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) * inter**-0.5).to(dtype)
    weights, ids = route(torch.randn(tokens, experts, generator=g), top_k, renormalize=True)
    return [t.to(device) for t in (x, w13, w2, weights, ids)]


def naive_moe(x, w13, w2, weights, ids) -> torch.Tensor:
    """The definition, one (token, slot) pair at a time in float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if not 0 <= e < w13.shape[0]:
                continue
            gate, up = (w13[e].double() @ x[t].double()).chunk(2)
            out[t] += float(weights[t, j]) * (w2[e].double() @ (F.silu(gate) * up))
    return out


def test_align_sorts_pairs_into_one_expert_blocks() -> None:
    ids = torch.tensor([[2, 0], [2, 1], [0, 2], [7, -1], [2, 2]])  # 7 and -1: other ranks' experts
    sorted_pairs, block_expert, num_padded = moe_reference.moe_align(ids, num_experts=3, block_m=4)
    n_pad = int(num_padded)
    assert n_pad == 4 + 4 + 8  # expert 0: 2 pairs, 1: 1 pair, 2: 5 pairs, each padded to 4
    real = sorted_pairs[:n_pad]
    flat = ids.reshape(-1)
    kept = real[real < flat.numel()].long()
    assert sorted(kept.tolist()) == [i for i, e in enumerate(flat.tolist()) if 0 <= e < 3]
    for b in range(n_pad // 4):
        pairs = real[4 * b : 4 * b + 4]
        pairs = pairs[pairs < flat.numel()].long()
        assert (flat[pairs] == block_expert[b]).all()
    assert (sorted_pairs[n_pad:] == flat.numel()).all()  # beyond the real blocks: padding only


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_reference_matches_naive(dtype: torch.dtype) -> None:
    x, w13, w2, weights, ids = moe_case(9, 48, 40, 5, 2, dtype)
    ids[3, 1] = -1  # dropped pair
    ref = moe_reference.fused_moe(x, w13, w2, weights, ids)
    assert ref.dtype == dtype
    assert rel_err(ref, naive_moe(x, w13, w2, weights, ids)) <= (1e-6 if dtype == F32 else 1e-2)


@pytest.mark.parametrize(
    ("tokens", "hidden", "inter", "experts", "top_k", "dtype"),
    [
        (1, 64, 32, 8, 2, F32),  # decode: one token, most experts idle
        (7, 48, 40, 5, 2, F32),  # dims not multiples of the tile
        (33, 64, 96, 4, 1, BF16),
        (20, 32, 48, 6, 3, F16),
        (40, 96, 64, 8, 2, BF16),  # several M-blocks per expert
    ],
)
def test_kernel_matches_reference(tokens, hidden, inter, experts, top_k, dtype) -> None:
    x, w13, w2, weights, ids = moe_case(tokens, hidden, inter, experts, top_k, dtype)
    out = K.fused_moe(x, w13, w2, weights, ids)
    ref = moe_reference.fused_moe(x, w13, w2, weights, ids)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, ref) <= (1e-5 if dtype == F32 else 1e-2)


def test_kernel_drops_other_ranks_pairs_and_takes_explicit_tiles() -> None:
    x, w13, w2, weights, ids = moe_case(12, 64, 32, 4, 2, F32)
    ids[::3, 0] += 4  # ids 4..7 belong to another expert-parallel rank
    cfg = MoETiles(block_m=32, block_n=16, block_k=16, num_stages=1)
    out = K.fused_moe(x, w13, w2, weights, ids, config=cfg)
    assert rel_err(out, moe_reference.fused_moe(x, w13, w2, weights, ids)) <= 1e-5
    assert rel_err(out, naive_moe(x, w13, w2, weights, ids)) <= 1e-5


def test_empty_batch() -> None:
    x, w13, w2, weights, ids = moe_case(0, 32, 16, 4, 2, F32)
    assert K.fused_moe(x, w13, w2, weights, ids).shape == (0, 32)
    assert moe_reference.fused_moe(x, w13, w2, weights, ids).shape == (0, 32)


def test_ops_uses_the_reference_on_cpu() -> None:
    x, w13, w2, weights, ids = moe_case(5, 32, 16, 4, 2, F32)
    assert torch.equal(ops.fused_moe(x, w13, w2, weights, ids), moe_reference.fused_moe(x, w13, w2, weights, ids))
    with ops.force_reference(["fused_moe"]):
        assert ops.fused_moe(x, w13, w2, weights, ids).shape == x.shape


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("w2_shape", r"w13 .* / w2 .*: expected"),
        ("weights_dtype", "topk_weights: dtype"),
        ("ids_rows", r"topk_ids .* expected \[T, k\]"),
        ("w_dtype", "w13: dtype"),
    ],
)
def test_bad_arguments_are_named(change: str, match: str) -> None:
    x, w13, w2, weights, ids = moe_case(4, 32, 16, 4, 2, F32)
    if change == "w2_shape":
        w2 = w2[:, :, :8]
    elif change == "weights_dtype":
        weights = weights.double()
    elif change == "ids_rows":
        ids = ids[:3]
    else:
        w13 = w13.double()
    with pytest.raises(ValueError, match=match):
        K.fused_moe(x, w13, w2, weights, ids)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 64, 256])
def test_kernel_on_gpu_mixtral_like(tokens: int) -> None:
    x, w13, w2, weights, ids = moe_case(tokens, 1024, 3584, 8, 2, BF16, device="cuda")
    out = K.fused_moe(x, w13, w2, weights, ids)
    assert rel_err(out, moe_reference.fused_moe(x, w13, w2, weights, ids)) <= 1e-2


@pytest.mark.parametrize(("tokens", "top_k", "experts", "block_m"), [(1, 2, 8, 16), (9, 2, 5, 16), (700, 2, 4, 32)])
def test_align_kernel_matches_reference(tokens: int, top_k: int, experts: int, block_m: int) -> None:
    g = torch.Generator().manual_seed(case_seed("align", tokens, experts))
    ids = torch.randint(-1, experts + 1, (tokens, top_k), generator=g)  # -1 and E: other ranks' experts
    got = K.moe_align(ids, experts, block_m)
    want = moe_reference.moe_align(ids, experts, block_m)
    n = int(want[2])
    assert int(got[2]) == n
    assert torch.equal(got[0][:n], want[0][:n])
    assert torch.equal(got[1][: n // block_m], want[1][: n // block_m])
