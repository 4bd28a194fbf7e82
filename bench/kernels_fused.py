"""Fused small ops against copy bandwidth, beside the torch reference (eager) on the same inputs."""

from __future__ import annotations

import json
from collections.abc import Callable

import torch

from gpu_kernels import reference
from gpu_kernels import triton_ops as K
from gpu_kernels.testing import rel_err

HQ, HKV, D, PAGE = 32, 8, 128, 16
BF16 = torch.bfloat16


def time_ms(fn: Callable) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median"))


def _fused_cases(g: torch.Generator) -> list[tuple[str, int, Callable, Callable, Callable[[], float]]]:
    """(name, bytes that must move, ours, torch reference, check) per op; Llama-3.1-8B sizes."""
    cases = []
    t, h, inter = 16384, 4096, 14336
    x = torch.randn(t, h, device="cuda", dtype=BF16, generator=g)
    res = torch.randn(t, h, device="cuda", dtype=BF16, generator=g)
    w = torch.randn(h, device="cuda", dtype=BF16, generator=g)
    cases.append(
        (
            f"rms_norm+residual [{t}x{h}]",
            4 * t * h * 2 + 2 * h,
            lambda: K.rms_norm(x, w, 1e-5, res),
            lambda: reference.rms_norm(x, w, 1e-5, res),
            lambda: rel_err(K.rms_norm(x, w, 1e-5, res)[0], reference.rms_norm(x, w, 1e-5, res)[0]),
        )
    )
    gu = torch.randn(8192, 2 * inter, device="cuda", dtype=BF16, generator=g)
    cases.append(
        (
            f"silu_mul [8192x2x{inter}]",
            3 * 8192 * inter * 2,
            lambda: K.silu_mul(gu),
            lambda: reference.silu_mul(gu),
            lambda: rel_err(K.silu_mul(gu), reference.silu_mul(gu)),
        )
    )
    q = torch.randn(t, HQ, D, device="cuda", dtype=BF16, generator=g)
    k = torch.randn(t, HKV, D, device="cuda", dtype=BF16, generator=g)
    v = torch.randn(t, HKV, D, device="cuda", dtype=BF16, generator=g)
    pos = torch.randint(0, 131072, (t,), device="cuda", generator=g)
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    scaling["original_max_position_embeddings"] = 8192
    cos_sin = reference.rope_cos_sin_cache(D, 131072, 500000.0, scaling).cuda()
    slots = torch.randperm(t * 2, device="cuda", generator=g)[:t]
    for kv_dt in (BF16, torch.float8_e4m3fn):
        es = torch.empty((), dtype=kv_dt).element_size()
        kv = torch.zeros(t * 2 // PAGE, 2, HKV, PAGE, D, device="cuda", dtype=kv_dt)
        kv_ref = kv.clone()
        sc = (torch.tensor(0.5, device="cuda"), torch.tensor(0.5, device="cuda")) if es == 1 else (None, None)
        # read q, k, v, cos|sin, positions, slots; write rotated q, k and the cache slots
        nbytes = t * D * (2 * (HQ + 2 * HKV) + 4 + 2 * (HQ + HKV) + es * 2 * HKV) + t * 16

        def ours(kv=kv, sc=sc):
            return K.rope_and_write_kv(q, k, v, pos, cos_sin, kv, slots, *sc)

        def ref(kv=kv_ref, sc=sc):
            return reference.rope_and_write_kv(q, k, v, pos, cos_sin, kv, slots, *sc)

        def check(ours=ours, ref=ref, kv=kv, kv_ref=kv_ref) -> float:
            ours()
            ref()
            return rel_err(kv.float(), kv_ref.float())

        cases.append(
            (
                f"rope+write_kv [{t} tok, 32/8 heads, {str(kv_dt).split('.')[-1]} cache]",
                nbytes,
                ours,
                ref,
                check,
            )
        )
    xq = torch.randn(1 << 27, device="cuda", dtype=BF16, generator=g)
    s = torch.tensor(0.05, device="cuda")

    def fp8_check() -> float:  # must be bit-exact: 0.0 or 1.0
        return float(
            not torch.equal(
                K.fp8_quantize(xq, s).view(torch.uint8), reference.fp8_quantize(xq, s).view(torch.uint8)
            )
        )

    cases.append(
        (
            "fp8_quantize [128M bf16]",
            3 * xq.numel(),
            lambda: K.fp8_quantize(xq, s),
            lambda: reference.fp8_quantize(xq, s),
            fp8_check,
        )
    )
    return cases


def bench_fused(copy_bw: float) -> list[dict]:
    rows = []
    for name, nbytes, ours, ref, check in _fused_cases(torch.Generator(device="cuda").manual_seed(1)):
        try:
            err = check()
            t, tr = time_ms(ours), time_ms(ref)
        except Exception as e:  # record and go on
            rows.append({"op": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        row = {
            "op": name,
            "MB": nbytes / 1e6,
            "ours_us": t * 1e3,
            "GBs": nbytes / t / 1e6,
            "vs_copy": nbytes / t / 1e-3 / copy_bw,
            "torch_us": tr * 1e3,
            "err": err,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    torch.cuda.empty_cache()
    return rows
