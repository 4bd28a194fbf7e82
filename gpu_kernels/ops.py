"""One function per op: the Triton kernel for CUDA tensors, the torch reference otherwise.

The engine calls only these. Selecting by device (not by a global flag) keeps CPU and GPU
workers in one process tree free of shared mutable state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextvars import ContextVar

import torch

from gpu_kernels import moe_reference, reference

# the ops forced onto their torch twins (None: none); a frozenset so the context var stays immutable
_FORCE_REFERENCE: ContextVar[frozenset[str] | None] = ContextVar("splitserve_force_reference", default=None)
# attention kernels in exact numerics (`gpu_kernels.exact_attention`)
_EXACT_ATTENTION: ContextVar[bool] = ContextVar("splitserve_exact_attention", default=False)

OPS = (
    "fused_moe",
    "paged_context_attention",
    "paged_decode_attention",
    "rms_norm",
    "rope_and_write_kv",
    "silu_mul",
    "write_kv",
)
__all__ = ["OPS", "exact_attention", "force_reference", *OPS]


@contextlib.contextmanager
def force_reference(ops: Iterable[str] | None = None) -> Iterator[None]:
    """Run the torch twins even on CUDA tensors (kernel-vs-reference checks of a whole model).

    ``ops`` names the ops to force (default: all), so a whole-model difference can be traced
    to the op that causes it.
    """
    names = frozenset(OPS if ops is None else ops)
    unknown = names - frozenset(OPS)
    if unknown:
        raise ValueError(f"force_reference: unknown ops {sorted(unknown)}; known: {list(OPS)}")
    token = _FORCE_REFERENCE.set(names)
    try:
        yield
    finally:
        _FORCE_REFERENCE.reset(token)


@contextlib.contextmanager
def exact_attention(enabled: bool = True) -> Iterator[None]:
    """Run the attention kernels in float64 exact numerics: the references' bits, slowly.

    For checking a whole model on the kernels against the references token for token, and for
    runs that must not depend on tiling or batch composition. CPU runs are unaffected (they use
    the references, which are what exact mode reproduces).
    """
    token = _EXACT_ATTENTION.set(bool(enabled))
    try:
        yield
    finally:
        _EXACT_ATTENTION.reset(token)


def _triton_enabled(t: torch.Tensor, op: str) -> bool:
    forced = _FORCE_REFERENCE.get()
    return t.is_cuda and (forced is None or op not in forced)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if _triton_enabled(x, "rms_norm"):
        from gpu_kernels.triton_ops import rms_norm as k

        return k(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    if _triton_enabled(x, "silu_mul"):
        from gpu_kernels.triton_ops import silu_mul as k

        return k(x)
    return reference.silu_mul(x)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The routed experts' SiLU-gated MLP, weighted and summed per token (`gpu_kernels.fused_moe`)."""
    if _triton_enabled(x, "fused_moe"):
        from gpu_kernels.triton_ops import fused_moe as kern

        return kern(x, w13, w2, topk_weights, topk_ids)
    return moe_reference.fused_moe(x, w13, w2, topk_weights, topk_ids)


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
    if _triton_enabled(q, "rope_and_write_kv"):
        from gpu_kernels.triton_ops import rope_and_write_kv as kern

        return kern(q, k, v, positions, cos_sin_cache, kv_layer, slot_mapping, k_scale, v_scale)
    return reference.rope_and_write_kv(
        q, k, v, positions, cos_sin_cache, kv_layer, slot_mapping, k_scale, v_scale
    )


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    if _triton_enabled(k, "write_kv"):
        from gpu_kernels.triton_ops import write_kv as kern

        kern(k, v, kv_layer, slot_mapping, k_scale, v_scale)
        return
    reference.write_kv(k, v, kv_layer, slot_mapping, k_scale, v_scale)


def paged_decode_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    multi_block: bool | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """``max_seq_len`` (host int, optional) sizes the multi-block split to the real lengths."""
    if _triton_enabled(q, "paged_decode_attention"):
        from gpu_kernels.triton_ops import paged_decode_attention as kern

        return kern(
            q, kv_layer, block_tables, seq_lens, scale, k_scale, v_scale,
            multi_block=multi_block, max_seq_len=max_seq_len, exact=_EXACT_ATTENTION.get(),
        )
    return reference.paged_decode_attention(q, kv_layer, block_tables, seq_lens, scale, k_scale, v_scale)


def paged_context_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    max_query_len: int | None = None,
) -> torch.Tensor:
    if _triton_enabled(q, "paged_context_attention"):
        from gpu_kernels.triton_ops import paged_context_attention as kern

        return kern(
            q, kv_layer, block_tables, query_start_loc, seq_lens, scale, k_scale, v_scale,
            max_query_len=max_query_len, exact=_EXACT_ATTENTION.get(),
        )
    return reference.paged_context_attention(
        q, kv_layer, block_tables, query_start_loc, seq_lens, scale, k_scale, v_scale
    )
