"""Make Triton 3.6's interpreter (CI's CPU runs) compute what the GPU computes.

CI checks every kernel under ``TRITON_INTERPRET=1``. Four interpreter defects would make those
checks fail, or pass for the wrong reason; each is fixed here, in the interpreter only:

1. ``range(start, end)`` with run-time bounds calls ``int()`` on a 1-element array, a
   ``TypeError`` since NumPy 2.4 (triton-lang/triton#9171; upstream fix #9172, after 3.6).
2. ``tl.dot`` on bf16 operands multiplies their raw 16-bit patterns as integers (bf16 is
   stored as uint16 there). We widen bf16 operands to float32 first, which is exact.
3. float32 -> bf16 casts truncate; the GPU rounds to nearest even. We round to nearest even.
4. float32/16 -> float8 e4m3 casts round half-up and can carry a mantissa overflow into the
   wrong exponent; the GPU rounds to nearest even. We cast through torch, which rounds to
   nearest even like the GPU's ``cvt.rn``.

Patches wrap the interpreter's own functions, are applied once, and only when the
interpreter is on. A Triton whose interpreter is laid out differently is left alone.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

_applied = False


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _to_e4m3_bits(x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.float8_e4m3fn)
    return t.view(torch.uint8).numpy()


def apply() -> None:
    global _applied
    if _applied or os.environ.get("TRITON_INTERPRET") != "1":
        return
    _applied = True
    import triton.language as tl
    from triton.runtime import interpreter as it

    builder = getattr(it, "InterpreterBuilder", None)
    handle = getattr(it, "TensorHandle", None)
    needed = ("cast_impl", "create_fp_to_fp", "create_dot")
    if builder is None or handle is None or not all(hasattr(builder, n) for n in needed):
        return

    patch_tensor = getattr(it, "_patch_lang_tensor", None)
    if patch_tensor is not None:

        def patched_lang_tensor(tensor: Any, scope: Any) -> None:
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

        it._patch_lang_tensor = patched_lang_tensor

    def widen(h: Any) -> Any:
        if h.dtype.scalar == tl.bfloat16:
            return handle(_bf16_bits_to_f32(h.data), tl.float32)
        return h

    def as_f32(h: Any) -> np.ndarray:
        if h.dtype.scalar == tl.bfloat16:
            return _bf16_bits_to_f32(h.data)
        return h.data.astype(np.float32)

    cast_impl, fp_to_fp, create_dot = builder.cast_impl, builder.create_fp_to_fp, builder.create_dot

    def patched_cast(self: Any, src: Any, dst_type: Any) -> Any:
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return handle(_f32_to_bf16_bits(src.data), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    def patched_fp_to_fp(self: Any, src: Any, dst_type: Any, rounding_mode: Any) -> Any:
        wide = (tl.float32, tl.float16, tl.bfloat16)
        if dst_type.scalar == tl.float8e4nv and src.dtype.scalar in wide:
            return handle(_to_e4m3_bits(as_f32(src)), tl.float8e4nv)
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar in wide:
            return handle(_f32_to_bf16_bits(as_f32(src)), tl.bfloat16)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    def patched_dot(self: Any, a: Any, b: Any, d: Any, *args: Any) -> Any:
        return create_dot(self, widen(a), widen(b), d, *args)

    builder.cast_impl = patched_cast
    builder.create_fp_to_fp = patched_fp_to_fp
    builder.create_dot = patched_dot
