"""SiLU(gate) * up over the fused gate|up projection output.

One pass: read ``[T, 2I]`` once, write ``[T, I]`` once (unfused: silu writes and re-reads an
intermediate). Rounds like the reference: silu is rounded to the activation dtype before the
multiply, as ``F.silu(gate) * up`` does in bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_kernels import interpreter_compat
from gpu_kernels.checks import FLOAT_DTYPES, cdiv, check_tensor, ensure_runnable

interpreter_compat.apply()

_BLOCK = 1024


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    y = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, y.to(gate.dtype), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """``x: [..., 2I]`` (gate | up) -> ``silu(gate) * up: [..., I]``."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    ensure_runnable(x)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"x: last dim must be even (gate | up), got shape {tuple(x.shape)}")
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)
    if x2.shape[0] and inter:
        _silu_mul_kernel[(x2.shape[0], cdiv(inter, _BLOCK))](
            x2, out, inter, x2.stride(0), out.stride(0), BLOCK=_BLOCK, num_warps=4
        )
    return out.view(*x.shape[:-1], inter)
