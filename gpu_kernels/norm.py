"""RMSNorm with the residual add fused in.

Unfused, a decoder layer reads the hidden state three times around each norm (add, norm,
weight); fused, each row is read once (x, residual, weight) and written twice (normed output,
new residual). It mirrors the reference's rounding: the sum is rounded to the activation dtype
before it is normalised, and the normalised value is rounded before the weight multiplies it;
for 16-bit inputs the mean square is summed in float64, like the reference, so the two agree
bit for bit instead of to the ulp of a float32 sum whose order differs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_kernels import interpreter_compat
from gpu_kernels.checks import FLOAT_DTYPES, check_shape, check_tensor, ensure_runnable, next_pow2

interpreter_compat.apply()


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
    n_cols, eps,
    stride_x, stride_res, stride_out, stride_new_res,
    HAS_RESIDUAL: tl.constexpr, EXACT_SUM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(new_res_ptr + row * stride_new_res + offs, x, mask=mask)
    h = x.to(tl.float32)
    if EXACT_SUM:  # 16-bit input: float64 sum and IEEE sqrt/div, the reference's bits
        h64 = h.to(tl.float64)
        eps64 = tl.full([], eps, tl.float32).to(tl.float64)  # the float32 eps, as everywhere else
        inv = (1.0 / tl.sqrt(tl.sum(h64 * h64, 0) / n_cols + eps64)).to(tl.float32)
    else:
        inv = 1.0 / tl.sqrt(tl.sum(h * h, 0) / n_cols + eps)
    normed = (h * inv).to(x.dtype)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out_dtype = out_ptr.dtype.element_ty
    y = w.to(out_dtype).to(tl.float32) * normed.to(out_dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, y.to(out_dtype), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x (+ residual)`` normalised over the last dim; returns ``(out, new_residual)``."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    ensure_runnable(x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x: expected [..., hidden] with hidden > 0, got shape {tuple(x.shape)}")
    hidden = x.shape[-1]
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    check_shape("weight", weight, (hidden,))
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,), device=x.device)
        check_shape("residual", residual, tuple(x.shape))
    x2 = x.reshape(-1, hidden)
    res2 = residual.reshape(-1, hidden) if residual is not None else x2
    out_dtype = torch.promote_types(weight.dtype, x.dtype)  # as `weight * h` does in the reference
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    new_res = torch.empty_like(x2) if residual is not None else out
    rows = x2.shape[0]
    if rows:
        block = next_pow2(hidden)
        _rms_norm_kernel[(rows,)](
            x2, res2, weight, out, new_res,
            hidden, float(eps),
            x2.stride(0), res2.stride(0), out.stride(0), new_res.stride(0),
            HAS_RESIDUAL=residual is not None, EXACT_SUM=x.dtype != torch.float32, BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
        )  # fmt: skip
    out = out.view(x.shape)
    return out, (new_res.view(x.shape) if residual is not None else None)
