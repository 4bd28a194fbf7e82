"""Argument checks and launch facts shared by the Triton wrappers.

A kernel that gets a wrong stride or dtype does not fail: it reads the wrong bytes. So every
wrapper checks its arguments up front and raises a ``ValueError`` that names the argument,
before anything is launched.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import cache

import torch

# Multiprocessor count assumed for CPU (interpreter) runs, so that the split heuristic gives
# the same answers it would on an H100/H200 and can be tested without a GPU.
CPU_ASSUMED_SM_COUNT = 132

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8_DTYPE = torch.float8_e4m3fn
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
    last_contiguous: bool = True,
) -> torch.Tensor:
    """Raise ``ValueError(name …)`` unless ``t`` is a tensor of the given rank, dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None:
        allowed = tuple(dtypes)
        if t.dtype not in allowed:
            raise ValueError(f"{name}: dtype {t.dtype} not in {[str(d) for d in allowed]}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device} like the other tensors")
    if last_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: last dim must be contiguous (stride 1), got strides {t.stride()}")
    return t


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(t.shape)}")


def check_pow2(name: str, value: int, lo: int, hi: int) -> None:
    """Triton's ``tl.arange`` needs power-of-two extents; the ranges are what we tested."""
    if value < lo or value > hi or value & (value - 1):
        raise ValueError(f"{name}: must be a power of two in {lo}..{hi}, got {value}")


def check_scale(name: str, s: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """FP8 scales stay on the device as 0-dim float32 so kernels read them without a host sync."""
    if s is None:
        return None
    check_tensor(name, s, dtypes=(torch.float32,), device=device, last_contiguous=False)
    if s.numel() != 1:
        raise ValueError(f"{name}: expected a per-tensor (1-element) scale, got shape {tuple(s.shape)}")
    return s


def check_kv_layer(kv_layer: torch.Tensor, device: torch.device) -> tuple[int, int, int, int]:
    """``[num_blocks, 2, num_kv_heads, block_size, head_dim]``; returns the four sizes."""
    check_tensor("kv_layer", kv_layer, ndim=5, dtypes=(*FLOAT_DTYPES, FP8_DTYPE), device=device)
    num_blocks, two, hkv, block_size, head_dim = kv_layer.shape
    if two != 2:
        raise ValueError(f"kv_layer: dim 1 must be 2 (K, V), got shape {tuple(kv_layer.shape)}")
    check_pow2("kv_layer block_size (dim 3)", block_size, 1, 1024)
    check_pow2("kv_layer head_dim (dim 4)", head_dim, 16, 256)
    return num_blocks, hkv, block_size, head_dim


def check_kv_dtype(q: torch.Tensor, kv_layer: torch.Tensor) -> bool:
    """KV is either the activations' dtype or FP8; returns whether it is FP8."""
    if kv_layer.dtype == FP8_DTYPE:
        return True
    if kv_layer.dtype != q.dtype:
        raise ValueError(f"kv_layer: dtype {kv_layer.dtype} must be FP8 e4m3 or match q ({q.dtype})")
    return False


def fp8_dot_dtype(q_dtype: torch.dtype, override: torch.dtype | None = None) -> torch.dtype:
    """The dtype FP8 KV is widened to for the tensor-core products.

    float16 for bf16/fp16 queries: e4m3 -> fp16 is one ``cvt`` per pair on Hopper while e4m3 ->
    bf16 is not, every e4m3 value is exact in fp16, and fp16 carries more mantissa than bf16
    for the probabilities and for q (whose values sit far inside fp16's ±65504). Measured on
    H100: see bench/NOTES-kernels.md. float32 queries keep float32.
    """
    if override is not None:
        if override not in FLOAT_DTYPES:
            raise ValueError(f"fp8_compute_dtype: must be one of {FLOAT_DTYPES}, got {override}")
        return override
    return torch.float32 if q_dtype == torch.float32 else torch.float16


def tl_dtype(dtype: torch.dtype) -> object:
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def scale_or_one(s: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    return s if s is not None else torch.ones((), dtype=torch.float32, device=device)


def ensure_runnable(t: torch.Tensor) -> None:
    """CPU tensors can only run through Triton's interpreter, which must be chosen before import."""
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"tensors on {t.device}: Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set "
            "before triton is imported (use gpu_kernels.reference on CPU otherwise)"
        )


@cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_ASSUMED_SM_COUNT
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
