"""Per-tensor FP8 (e4m3) quantisation, and the rounding helper the cache writers share.

``x / scale`` is clamped to ±448 and rounded to the nearest e4m3 value (ties to even), like
``torch.Tensor.to(torch.float8_e4m3fn)``, so kernel and reference agree bit for bit. The clamp
comes first because e4m3fn has no infinity: torch turns an overflow into NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_kernels import interpreter_compat
from gpu_kernels.checks import FLOAT_DTYPES, FP8_DTYPE, cdiv, check_scale, check_tensor, ensure_runnable

interpreter_compat.apply()

FP8_E4M3_MAX = 448.0
_BLOCK = 2048


@triton.jit
def quantize_e4m3(x, scale):
    """float32 ``x`` -> e4m3, as ``clamp(x / scale)`` then a round-to-nearest-even cast.

    An IEEE division, not a multiply by ``1/scale``: the two differ by an ulp now and then,
    which can move a value across an e4m3 rounding boundary.
    """
    y = tl.clamp(tl.div_rn(x, scale), -448.0, 448.0)
    return y.to(tl.float8e4nv)


@triton.jit
def _fp8_quantize_kernel(x_ptr, scale_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, quantize_e4m3(x, tl.load(scale_ptr)), mask=mask)


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``clamp(x / scale, ±448)`` as ``float8_e4m3fn``, same shape; ``scale`` a 0-dim float32."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, last_contiguous=False)
    ensure_runnable(x)
    s = check_scale("scale", scale, x.device)
    if s is None:
        raise ValueError("scale: required (a 0-dim float32 tensor on x's device)")
    xc = x.contiguous()
    out = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    n = xc.numel()
    if n:
        _fp8_quantize_kernel[(cdiv(n, _BLOCK),)](xc, s, out, n, BLOCK=_BLOCK, num_warps=4)
    return out
