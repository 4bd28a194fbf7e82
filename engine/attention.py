"""The one attention entry point of the model: paged, varlen, causal.

On CUDA this lands in the Triton kernels, on CPU in their torch twins (`gpu_kernels.ops`). Decode-only
batches take the decode kernel (one query per sequence, XQA grouping, multi-block split).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention_metadata import AttentionMetadata
from gpu_kernels import ops


@dataclass
class LayerKV:
    """One layer's view of the paged cache plus the FP8 scales (ones for non-FP8 pools)."""

    kv: torch.Tensor  # [num_blocks, 2, Hkv, block_size, D]
    k_scale: torch.Tensor
    v_scale: torch.Tensor


def paged_attention(q: torch.Tensor, cache: LayerKV, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """``q: [T, Hq, D]`` (new tokens, KV already written) -> ``[T, Hq, D]``."""
    if meta.is_decode_only:
        return ops.paged_decode_attention(
            q, cache.kv, meta.block_tables, meta.seq_lens, scale, cache.k_scale, cache.v_scale,
            max_seq_len=meta.max_seq_len,
        )
    return ops.paged_context_attention(
        q, cache.kv, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale,
        cache.k_scale, cache.v_scale, max_query_len=meta.max_query_len,
    )
