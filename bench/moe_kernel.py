"""Fused-MoE kernel vs torch grouped references vs the bandwidth floor of the expert weights it reads.

    python -m bench.moe_kernel [--out DIR] [--sweep] [--batches 1,16,64,256]
    python -m bench.moe_kernel --quick      # CPU smoke run: Triton interpreter, tiny shapes

A Mixtral-8x7B-shaped MoE layer (hidden 4096, expert intermediate 14336, 8 experts, top-2, bf16).
Per batch size:

* ``triton_ms``: `gpu_kernels.fused_moe.fused_moe` (alignment + both grouped GEMMs + the top-k sum)
  with its default tiles; ``--sweep`` also times a few tile choices and reports the best.
* ``loop_ms``: torch, pairs sorted by expert then one ``mm`` per touched expert (HF's approach).
* ``bmm_ms``: the CPU twin `gpu_kernels.moe_reference.fused_moe` (pairs packed per expert, padded bmm).
* ``floor_ms``: distinct experts the batch touches x bytes of one expert's weights / the
  device-to-device copy bandwidth measured in this run (the time just to read those weights).
Every timed kernel is first checked against the reference on the inputs it is timed on.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import measure_copy_bandwidth, print_table, save_result
from engine.layers.moe import route
from gpu_kernels import moe_reference
from gpu_kernels.testing import rel_err

MIXTRAL = {"hidden": 4096, "inter": 14336, "experts": 8, "top_k": 2}
TINY = {"hidden": 64, "inter": 128, "experts": 8, "top_k": 2}
TOL = 1e-2  # bf16 rounding
COLS = ["batch", "experts_hit", "weights_MB", "triton_ms", "best_ms", "loop_ms", "bmm_ms", "floor_ms",
        "floor_frac", "vs_loop", "rel_err"]


def torch_loop_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                   ids: torch.Tensor) -> torch.Tensor:
    """Sort pairs by expert, one ``mm`` per expert that has pairs (the reference benchmark only)."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    at = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[at : at + n]
        at += n
        gate, up = (x[pairs // k] @ w13[e].t()).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ w2[e].t()
        out.index_add_(0, pairs // k, y.float() * weights.reshape(-1)[pairs, None])
    return out.to(x.dtype)


def time_ms(fn: Callable[[], Any], device: str) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def candidates(quick: bool) -> list[Any]:
    from gpu_kernels.fused_moe import MoETiles

    if quick:
        return [MoETiles(16, 32, 32, 4, 1), MoETiles(32, 16, 64, 4, 1)]
    return [MoETiles(m, n, k, w, s) for m, n, k, w, s in (
        (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 4, 3), (32, 64, 64, 4, 4),
        (32, 128, 64, 4, 4), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4), (128, 128, 64, 8, 3),
    )]


def bench_batch(batch: int, shape: dict[str, int], device: str, bandwidth: float | None, sweep: bool,
                quick: bool) -> dict[str, Any]:
    import triton.runtime.errors

    from gpu_kernels.fused_moe import fused_moe

    g = torch.Generator(device=device).manual_seed(batch)
    h, i, e, k = shape["hidden"], shape["inter"], shape["experts"], shape["top_k"]
    x = torch.randn(batch, h, generator=g, device=device).to(torch.bfloat16)
    w13 = (torch.randn(e, 2 * i, h, generator=g, device=device) * h**-0.5).to(torch.bfloat16)
    w2 = (torch.randn(e, h, i, generator=g, device=device) * i**-0.5).to(torch.bfloat16)
    weights, ids = route(torch.randn(batch, e, generator=g, device=device), k, renormalize=True)
    ref = moe_reference.fused_moe(x, w13, w2, weights, ids)
    out = fused_moe(x, w13, w2, weights, ids)
    err = rel_err(out, ref)
    if err > TOL:
        raise AssertionError(f"batch {batch}: fused_moe rel err {err:.3g} > {TOL}")
    hit = int(torch.unique(ids).numel())
    expert_bytes = 3 * h * i * w13.element_size()
    row: dict[str, Any] = {
        "batch": batch, "experts_hit": hit, "weights_MB": hit * expert_bytes / 2**20, "rel_err": err,
        "triton_ms": time_ms(lambda: fused_moe(x, w13, w2, weights, ids), device),
        "loop_ms": time_ms(lambda: torch_loop_moe(x, w13, w2, weights, ids), device),
        "bmm_ms": time_ms(lambda: moe_reference.fused_moe(x, w13, w2, weights, ids), device),
    }
    if sweep:
        best = None
        for cfg in candidates(quick):
            try:
                fused_moe(x, w13, w2, weights, ids, config=cfg)
            except triton.runtime.errors.OutOfResources as e:  # a tile too large for this GPU's shared memory
                print(f"batch {batch}: tiles {cfg} skipped ({e})")
                continue
            if rel_err(fused_moe(x, w13, w2, weights, ids, config=cfg), ref) > TOL:
                raise AssertionError(f"batch {batch}: tiles {cfg} give a wrong result")
            ms = time_ms(lambda cfg=cfg: fused_moe(x, w13, w2, weights, ids, config=cfg), device)
            if best is None or ms < best[0]:
                best = (ms, cfg)
        assert best is not None
        row["best_ms"], row["best_tiles"] = best[0], vars(best[1])
    if bandwidth is not None:
        row["floor_ms"] = hit * expert_bytes / bandwidth * 1e3
        row["floor_frac"] = row["floor_ms"] / min(row["triton_ms"], row.get("best_ms", float("inf")))
    row["vs_loop"] = row["loop_ms"] / row["triton_ms"]
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: interpreter, tiny shapes")
    ap.add_argument("--sweep", action="store_true", help="also time a few tile choices, report the best")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,16,64,256)")
    ap.add_argument("--out", type=Path, action="append", default=[], help="also copy the JSON here")
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not a.quick else "cpu"
    if device == "cpu" and not a.quick:
        ap.error("needs a CUDA GPU; use --quick for a CPU smoke run")
    if device == "cpu":  # before triton's first import (gpu_kernels.fused_moe is imported lazily)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    shape = TINY if a.quick else MIXTRAL
    batches = [int(b) for b in a.batches.split(",")] if a.batches else ([1, 4] if a.quick else [1, 16, 64, 256])
    bandwidth = measure_copy_bandwidth() if device == "cuda" else None
    rows = [bench_batch(b, shape, device, bandwidth, a.sweep, a.quick) for b in batches]
    print_table(rows, [c for c in COLS if any(c in r for r in rows)])
    payload = {"shape": shape, "dtype": "bfloat16", "quick": a.quick, "copy_bandwidth_Bps": bandwidth,
               "rows": rows}
    path = save_result("moe_kernel" + ("-quick" if a.quick else ""), payload, a.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
