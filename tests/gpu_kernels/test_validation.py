"""The wrappers reject bad arguments with a ValueError that names the argument, before launching."""

from __future__ import annotations

import pytest
import torch

from gpu_kernels import triton_ops as K
from gpu_kernels.testing import make_paged_batch


@pytest.fixture
def pb():
    return make_paged_batch(
        [1, 1], [5, 9], num_kv_heads=2, group=2, head_dim=64, page=16, dtype=torch.float32
    )


def decode(pb, **over):
    args = {
        "q": pb.q, "kv_layer": pb.kv_layer, "block_tables": pb.block_tables, "seq_lens": pb.seq_lens,
        "scale": pb.scale,
    }  # fmt: skip
    args.update(over)
    return K.paged_decode_attention(**args)


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("kv_layer", lambda pb: pb.kv_layer[:, :1]),  # not [.., 2, ..]
        ("kv_layer", lambda pb: pb.kv_layer.to(torch.bfloat16)),  # dtype differs from q, not FP8
        ("kv_layer", lambda pb: pb.kv_layer[..., :48]),  # head_dim not a power of two
        ("block_tables", lambda pb: pb.block_tables.float()),
        ("block_tables", lambda pb: pb.block_tables[:1]),
        ("seq_lens", lambda pb: pb.seq_lens[:, None]),
        ("q", lambda pb: pb.q[..., :32]),  # head_dim mismatch
        ("q", lambda pb: pb.q.transpose(0, 2).contiguous().transpose(0, 2)),  # last dim strided
        ("q", lambda pb: pb.q[:, :3]),  # 3 query heads on 2 KV heads
    ],
)
def test_decode_rejects(pb, name, make):
    key = {"kv_layer": "kv_layer", "block_tables": "block_tables", "seq_lens": "seq_lens", "q": "q"}[name]
    with pytest.raises(ValueError, match=rf"^{name}"):
        decode(pb, **{key: make(pb)})


def test_scale_must_be_one_element(pb):
    with pytest.raises(ValueError, match=r"^k_scale"):
        decode(pb, k_scale=torch.ones(2))


def test_context_rejects_bad_query_start_loc(pb):
    with pytest.raises(ValueError, match=r"^query_start_loc"):
        K.paged_context_attention(
            pb.q, pb.kv_layer, pb.block_tables, pb.query_start_loc[:2], pb.seq_lens, 1.0
        )


def test_small_ops_reject():
    with pytest.raises(ValueError, match=r"^weight"):
        K.rms_norm(torch.randn(2, 8), torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match=r"^residual"):
        K.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6, torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"^x"):
        K.silu_mul(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"^scale"):
        K.fp8_quantize(torch.randn(4), torch.tensor(1.0, dtype=torch.float64))
    kv = torch.zeros(2, 2, 1, 16, 64)
    with pytest.raises(ValueError, match=r"^slot_mapping"):
        K.write_kv(torch.randn(3, 1, 64), torch.randn(3, 1, 64), kv, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^cos_sin_cache"):
        idx = torch.zeros(3, dtype=torch.int64)
        k = torch.randn(3, 1, 64)
        K.rope_and_write_kv(torch.randn(3, 2, 64), k, k, idx, torch.zeros(10, 32), kv, idx)


def test_force_reference_names_unknown_ops():
    from gpu_kernels.ops import OPS, force_reference

    with pytest.raises(ValueError, match="unknown ops"), force_reference(["rms_norm", "flash_attn"]):
        pass
    with force_reference(OPS[:1]):  # a known subset is accepted
        pass
