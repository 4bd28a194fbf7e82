"""Exact-numerics attention (Triton, interpreted on CPU): the torch reference's bits exactly.

The fast kernels are held to a tolerance; exact mode (`gpu_kernels.exact_attention`) is held to
equality, on 16-bit inputs where the reference computes in float64 and rounds once.
"""

from __future__ import annotations

import pytest
import torch

from gpu_kernels import ops, reference
from gpu_kernels import triton_ops as K
from gpu_kernels.exact_attention import context_rows
from gpu_kernels.testing import case_seed, make_paged_batch, rel_err

BF16, F16, FP8 = torch.bfloat16, torch.float16, torch.float8_e4m3fn

# (group, kv heads, head_dim, page, q dtype, kv dtype, q_lens, seq_lens)
CASES = [
    (1, 2, 64, 16, BF16, BF16, [1, 1, 1, 1], [1, 16, 17, 33]),  # on and just past page edges
    (3, 2, 64, 16, BF16, BF16, [5, 1, 16], [5, 40, 47]),  # SmolLM2's group, chunk + prefix
    (8, 1, 128, 32, F16, F16, [3, 1], [64, 65]),
    (4, 1, 64, 16, BF16, FP8, [7, 1], [30, 17]),
]


@pytest.mark.parametrize(("group", "hkv", "d", "page", "dt", "kv_dt", "q_lens", "lens"), CASES)
def test_exact_context_and_decode_equal_reference(group, hkv, d, page, dt, kv_dt, q_lens, lens):
    pb = make_paged_batch(
        q_lens, lens, num_kv_heads=hkv, group=group, head_dim=d, page=page, dtype=dt, kv_dtype=kv_dt,
        seed=case_seed("exact", group, hkv, d, page, dt, kv_dt, lens),
    )  # fmt: skip
    q = pb.q * 3  # a sharper softmax than unit q: larger probabilities to round alike
    args = (q, pb.kv_layer, pb.block_tables, pb.query_start_loc, pb.seq_lens, pb.scale, pb.k_scale, pb.v_scale)
    out = K.paged_context_attention(*args, exact=True)
    assert out.dtype == dt and torch.equal(out, reference.paged_context_attention(*args))
    last = (pb.query_start_loc[1:] - 1).long()
    dargs = (q[last], pb.kv_layer, pb.block_tables, pb.seq_lens, pb.scale, pb.k_scale, pb.v_scale)
    ref = reference.paged_decode_attention(*dargs)
    for mb in (False, True):  # tuning arguments do not reach exact mode
        assert torch.equal(K.paged_decode_attention(*dargs, multi_block=mb, exact=True), ref)


def test_fast_kernels_are_not_bit_identical_here():
    """The control: the same bf16 case on the fast path differs from the reference somewhere
    (otherwise the equality above would prove nothing about exact mode)."""
    pb = make_paged_batch([16, 1], [47, 40], num_kv_heads=2, group=3, head_dim=64, page=16, dtype=BF16, seed=5)
    args = (pb.q * 3, pb.kv_layer, pb.block_tables, pb.query_start_loc, pb.seq_lens, pb.scale)
    assert not torch.equal(K.paged_context_attention(*args), reference.paged_context_attention(*args))


def test_context_rows():
    """Each new token sees its own position + 1 keys of its own sequence's table row."""
    qsl = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    rows, lens = context_rows(qsl, torch.tensor([10, 4, 3], dtype=torch.int32), 5)
    assert rows.tolist() == [0, 0, 2, 2, 2]
    assert lens.tolist() == [9, 10, 1, 2, 3]


def test_ops_pass_exact_mode_to_the_kernels(monkeypatch):
    """`ops.exact_attention` reaches both attention kernels, and only inside its block."""
    seen: list[tuple[str, bool]] = []
    for name in ("paged_decode_attention", "paged_context_attention"):
        real = getattr(K, name)

        def spy(*a, _real=real, _name=name, **kw):
            seen.append((_name, kw["exact"]))
            return _real(*a, **kw)

        monkeypatch.setattr(K, name, spy)
    monkeypatch.setattr(ops, "_triton_enabled", lambda t, op: True)  # CPU tensors, interpreted kernels
    pb = make_paged_batch([2], [20], num_kv_heads=1, group=3, head_dim=64, page=16, dtype=BF16, seed=1)
    cargs = (pb.q, pb.kv_layer, pb.block_tables, pb.query_start_loc, pb.seq_lens, pb.scale)
    dargs = (pb.q[-1:], pb.kv_layer, pb.block_tables, pb.seq_lens, pb.scale)
    with ops.exact_attention():
        exact_c = ops.paged_context_attention(*cargs)
        exact_d = ops.paged_decode_attention(*dargs)
    ops.paged_decode_attention(*dargs)
    assert seen == [
        ("paged_context_attention", True), ("paged_decode_attention", True), ("paged_decode_attention", False),
    ]
    assert torch.equal(exact_c, reference.paged_context_attention(*cargs))
    assert torch.equal(exact_d, reference.paged_decode_attention(*dargs))


def test_exact_mode_on_float32_inputs_is_within_float32_tolerance():
    """float32 references stay in float32 (HF parity), so exact mode is held to the 1e-5 bound there."""
    pb = make_paged_batch([4, 1], [37, 16], num_kv_heads=2, group=3, head_dim=64, page=16, dtype=torch.float32,
                          seed=11)  # fmt: skip
    args = (pb.q, pb.kv_layer, pb.block_tables, pb.query_start_loc, pb.seq_lens, pb.scale)
    out = K.paged_context_attention(*args, exact=True)
    assert out.dtype == torch.float32
    assert rel_err(out, reference.paged_context_attention(*args)) <= 1e-5
