"""Decode step time of the engine vs the HBM floor, and prefill MFU vs the matmul rate.

``python -m bench.decode_speed`` (CUDA): random-weight Llama-3.1-8B in bf16 through `LLMEngine`,
decode at batch 1/16/64/256 with ~1K tokens of context each and batch 64 at 8K; per mode
(``eager``: no graphs, no overlap; ``graphs``: CUDA graphs; ``overlap``: graphs + overlap
scheduling) it reports ms per step, tokens/s and the floor: weights + the batch's KV bytes over
the device copy bandwidth measured in the same run. Prefill of one 2K and one 8K prompt gives
the MFU against a bf16 matmul rate measured in the same run. A batch whose KV does not fit is
shrunk to what fits (the row says so). ``--quick``: a tiny Llama on CPU (tests run it).
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import measure_copy_bandwidth, measure_matmul_flops, print_table, save_result
from bench.shapes import model_dir
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

MODES = {"eager": (False, False), "graphs": (True, False), "overlap": (True, True)}  # (cuda_graphs, overlap)
COLS = ["mode", "batch", "context", "step_ms", "tok_s", "floor_ms", "of_floor", "note"]
PREFILL_COLS = ["mode", "prompt", "prefill_ms", "tflops", "mfu"]


@dataclass(frozen=True)
class Plan:
    shape: str
    device: str
    dtype: torch.dtype
    decode: list[tuple[int, int]]  # (batch, context)
    prefill: list[int]
    steps: int
    warmup: int
    max_num_batched_tokens: int
    kv_memory: int | None  # None: from free GPU memory


FULL = Plan("llama-3.1-8b", "cuda", torch.bfloat16, [(1, 1024), (16, 1024), (64, 1024), (256, 1024), (64, 8192)],
            [2048, 8192], steps=32, warmup=4, max_num_batched_tokens=8192, kv_memory=None)
QUICK = Plan("llama-tiny", "cpu", torch.float32, [(1, 64), (4, 64), (2, 256)], [128, 256], steps=3, warmup=1,
             max_num_batched_tokens=512, kv_memory=16 * 2**20)


def build_engine(plan: Plan, folder: Path, graphs: bool, overlap: bool) -> LLMEngine:
    max_seqs = max(b for b, _ in plan.decode)
    max_len = max(c for _, c in plan.decode) + plan.steps + plan.warmup + 16
    cfg = EngineConfig(
        model=str(folder), dtype=plan.dtype, device=plan.device, random_weights=True,
        cache=CacheConfig(memory_bytes=plan.kv_memory or 2**20, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=plan.max_num_batched_tokens,
                                  max_model_len=max(max_len, max(plan.prefill) + 16)),
        cuda_graphs=graphs, overlap_scheduling=overlap,
        gpu_memory_utilization=None if plan.kv_memory else 0.9,
    )  # fmt: skip
    return LLMEngine(cfg)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _drain(engine: LLMEngine) -> None:
    for rid in list(engine.outputs.requests):
        engine.abort_request(rid)
    while engine.has_schedulable_requests():
        engine.step()


def time_decode(engine: LLMEngine, plan: Plan, batch: int, context: int, seed: int) -> dict[str, Any]:
    """Prefill ``batch`` prompts of ``context`` tokens, then time ``plan.steps`` decode steps."""
    cap = engine.layout.num_blocks * engine.layout.block_size
    fits = min(batch, max(1, cap // (context + plan.steps + plan.warmup + 16)))
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=plan.steps + plan.warmup + 8, temperature=0, ignore_eos=True)
    for i in range(fits):
        engine.add_request(f"d{seed}-{i}", torch.randint(10, vocab, (context,), generator=gen).tolist(), params)
    sched = engine.scheduler
    while sched.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in sched.running):
        engine.step()
    for _ in range(plan.warmup):
        engine.step()
    _sync(plan.device)
    t0 = time.perf_counter()
    for _ in range(plan.steps):
        engine.step()
    _sync(plan.device)
    step_s = (time.perf_counter() - t0) / plan.steps
    _drain(engine)
    return {"batch": fits, "context": context, "step_ms": step_s * 1e3, "tok_s": fits / step_s,
            "note": "" if fits == batch else f"KV fits {fits} of {batch}"}  # fmt: skip


def decode_floor_s(engine: LLMEngine, batch: int, context: int, bandwidth: float) -> float:
    """Weights once (the embedding table aside: a step reads only its batch's rows) plus every
    row's KV once, at the measured copy bandwidth."""
    weights = sum(p.numel() * p.element_size() for n, p in engine.model.named_parameters() if "embed_tokens" not in n)
    lay = engine.layout
    kv_per_token = lay.num_layers * 2 * lay.num_kv_heads * lay.head_dim * lay.element_size
    return (weights + batch * context * kv_per_token) / bandwidth


def time_prefill(engine: LLMEngine, plan: Plan, tokens: int, matmul_rate: float) -> dict[str, Any]:
    """One prompt of ``tokens`` tokens to its first token; FLOPs: 2 x params x tokens for the
    matmuls plus the causal attention's two products."""
    cfg: ModelConfig = engine.model_config
    ids = torch.randint(10, cfg.vocab_size, (tokens,), generator=torch.Generator().manual_seed(tokens)).tolist()
    engine.add_request(f"p{tokens}", ids, SamplingParams(max_tokens=1, temperature=0))
    _sync(plan.device)
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    _sync(plan.device)
    secs = time.perf_counter() - t0
    _drain(engine)
    params = sum(p.numel() for n, p in engine.model.named_parameters() if "embed_tokens" not in n)
    attn = 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * tokens * tokens  # QK^T and PV, causal half
    flops = 2 * params * tokens + attn
    return {"prompt": tokens, "prefill_ms": secs * 1e3, "tflops": flops / secs / 1e12,
            "mfu": flops / secs / matmul_rate}  # fmt: skip


def _ceilings(plan: Plan) -> tuple[float, float]:
    if plan.device == "cuda":
        return measure_copy_bandwidth(), measure_matmul_flops()
    a = torch.empty(2**22)
    t0 = time.perf_counter()
    for _ in range(5):
        a.clone()
    bw = 2 * a.numel() * 4 * 5 / (time.perf_counter() - t0)
    m = torch.randn(256, 256)
    t0 = time.perf_counter()
    for _ in range(5):
        m @ m
    return bw, 2 * 256**3 * 5 / (time.perf_counter() - t0)


def run(plan: Plan, modes: list[str]) -> dict[str, Any]:
    folder = model_dir(plan.shape)
    bandwidth, matmul_rate = _ceilings(plan)
    rows: list[dict[str, Any]] = []
    prefill: list[dict[str, Any]] = []
    for mode in modes:
        graphs, overlap = MODES[mode]
        engine = build_engine(plan, folder, graphs, overlap)
        for i, (batch, context) in enumerate(plan.decode):
            r = time_decode(engine, plan, batch, context, seed=i)
            floor = decode_floor_s(engine, r["batch"], context, bandwidth) * 1e3
            rows.append({"mode": mode, **r, "floor_ms": floor, "of_floor": floor / r["step_ms"]})
        prefill += [{"mode": mode, **time_prefill(engine, plan, n, matmul_rate)} for n in plan.prefill]
        rows[-1]["graphs_captured"] = engine.runner.graphs.num_captured
        del engine
        gc.collect()
        if plan.device == "cuda":
            torch.cuda.empty_cache()
    return {"shape": plan.shape, "dtype": str(plan.dtype), "copy_bandwidth_gbs": bandwidth / 1e9,
            "matmul_tflops": matmul_rate / 1e12, "steps": plan.steps, "decode": rows, "prefill": prefill}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run on a tiny Llama")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {list(MODES)}")
    ap.add_argument("--out", type=Path, action="append", default=[], help="also copy the JSON here")
    a = ap.parse_args(argv)
    modes = [m for m in a.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"--modes: unknown {unknown}; known: {list(MODES)}")
    if not a.quick and not torch.cuda.is_available():
        ap.error("needs a CUDA GPU; --quick runs the CPU smoke mode")
    if not a.quick:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # graph capture progress
    payload = run(QUICK if a.quick else FULL, modes)
    print_table(payload["decode"], COLS)
    print()
    print_table(payload["prefill"], PREFILL_COLS)
    path = save_result("decode_speed" + ("-quick" if a.quick else ""), payload, a.out)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
