"""The P·V step of both attention kernels (online softmax), at float32 precision for P.

Both kernels keep scores and probabilities in float32 but the tensor cores multiply 16-bit
operands. Rounding the probabilities to bf16 there is what flash-attention kernels usually do;
it moves each by up to 2**-9 and, against the float32 softmax of `gpu_kernels.reference`, flips the
rounding of a large share of bf16 outputs, so a bf16 model's greedy tokens part from the
reference's at near-ties. Splitting ``p = hi + lo`` into two bf16 products leaves 2**-17.

Off by default in both kernels: it did not make a random-weight bf16 model's greedy tokens
identical to the references' (BENCHMARKS.md, model check) and cost up to 30% in decode and
14-53% in prefill on H200. It stays an option for accuracy studies.
"""

from __future__ import annotations

import triton
import triton.language as tl

from gpu_kernels import interpreter_compat

interpreter_compat.apply()


@triton.jit
def accumulate_pv(acc, p, v, SPLIT_P: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + p @ v``; ``SPLIT_P`` costs one more MMA per tile for float32-grade ``p``."""
    if SPLIT_P:
        p_hi = p.to(v.dtype)
        p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
        acc = tl.dot(p_hi, v, acc, input_precision=PRECISION)
        return tl.dot(p_lo, v, acc, input_precision=PRECISION)
    return tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
