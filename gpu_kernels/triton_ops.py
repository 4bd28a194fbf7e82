"""The Triton side of `gpu_kernels.ops`: one checked wrapper per op, same signatures as `gpu_kernels.reference`.

Each wrapper lives beside its kernel (one file per concept); this module only gathers them, so
`gpu_kernels.ops` has one place to import from. The wrappers take CUDA tensors, or CPU tensors
when ``TRITON_INTERPRET=1`` (CI), and raise ``ValueError`` naming the bad argument.
"""

from __future__ import annotations

from gpu_kernels.activation import silu_mul
from gpu_kernels.context_attention import ContextConfig, paged_context_attention
from gpu_kernels.decode_attention import decode_num_splits, paged_decode_attention
from gpu_kernels.fused_moe import align as moe_align
from gpu_kernels.fused_moe import fused_moe
from gpu_kernels.norm import rms_norm
from gpu_kernels.quant import fp8_quantize
from gpu_kernels.rope_cache import rope_and_write_kv, write_kv

__all__ = [
    "ContextConfig",
    "decode_num_splits",
    "fp8_quantize",
    "fused_moe",
    "moe_align",
    "paged_context_attention",
    "paged_decode_attention",
    "rms_norm",
    "rope_and_write_kv",
    "silu_mul",
    "write_kv",
]
