"""GPU: the whole model with Triton kernels vs with the torch reference twins.

Random-weight Llama-3.1-8B shape: greedy tokens with the Triton kernels must equal those with
the torch references for the first 32 tokens, in float32 and in bf16. Random weights make
near-ties common (the table shows the smallest top-1/top-2 margin met), and a bf16 model turns
a one-ulp difference anywhere into a different token within a few steps, so bf16 identity needs
kernels that return the references' bits: the norm and RoPE kernels do, and the attention
kernels do in exact numerics (`gpu_kernels.exact_attention`); the fast attention kernels (the
serving default) round differently, which a row shows. More rows explain any difference: the
references run twice (a control: they must agree with themselves), and each op alone on its
kernel with the others on their references.

    python -m bench.model_check [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from bench.common import print_table, save_result
from bench.shapes import model_dir
from engine import LLM, SamplingParams
from gpu_kernels.ops import OPS, exact_attention, force_reference

ATTRIBUTED_OPS = [op for op in OPS if op != "write_kv"]  # the model writes KV through rope_and_write_kv
EXACT = "all, exact attention"


def _top2_gap(top: dict[int, float]) -> float:
    best = sorted(top.values(), reverse=True)
    return best[0] - best[1] if len(best) > 1 else 0.0


def _run(llm: LLM, prompts: list[list[int]], tokens: int) -> tuple[list[list[int]], list[list[float]], float]:
    """Greedy tokens, and per step the top-1 minus top-2 logprob (how close the call was)."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, logprobs=2)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    torch.cuda.synchronize()
    margins = []
    for o in outs:
        tops = o.outputs[0].top_logprobs or []
        margins.append([_top2_gap(d) for d in tops])
    return [o.token_ids for o in outs], margins, time.perf_counter() - t0


def _compare(dtype: str, variant: str, prompts: list[list[int]], a: list[list[int]], b: list[list[int]],
             margins: list[list[float]]) -> list[dict[str, object]]:
    rows = []
    for p, x, y, m in zip(prompts, a, b, margins):
        first_diff = next((i for i, (u, w) in enumerate(zip(x, y)) if u != w), None)
        rows.append({
            "dtype": dtype, "kernels": variant, "prompt_len": len(p), "tokens": len(x), "identical": x == y,
            "first_diff": first_diff if first_diff is not None else "-",
            "margin_at_diff": round(m[first_diff], 4) if first_diff is not None else "-",
            "min_margin": round(min(m), 4),
        })
    return rows


def check(dtype: str, tokens: int, attribute: bool) -> dict[str, object]:
    """Kernels vs references, with the control run; with ``attribute``, exact mode and each op alone."""
    llm = LLM(
        model_dir("llama-3.1-8b"), dtype=dtype, device="cuda", random_weights=True,
        num_kv_blocks=1024, max_model_len=4096, max_num_batched_tokens=4096, enable_prefix_caching=False,
    )
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128000, (n,), generator=gen).tolist() for n in (7, 100, 513, 1500)]
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up / JIT
    with force_reference():
        reference, ref_margins, t_reference = _run(llm, prompts, tokens)
        again, _, _ = _run(llm, prompts, tokens)
    rows = _compare(dtype, "none (references again: control)", prompts, again, reference, ref_margins)
    kernels, _, t_kernels = _run(llm, prompts, tokens)
    rows += _compare(dtype, "all", prompts, kernels, reference, ref_margins)
    walls = {"wall_s_kernels": t_kernels, "wall_s_reference": t_reference}
    if attribute:
        with exact_attention():
            exact, _, walls["wall_s_exact"] = _run(llm, prompts, tokens)
        rows += _compare(dtype, EXACT, prompts, exact, reference, ref_margins)
        for op in ATTRIBUTED_OPS:
            on = {op, "write_kv"} if op == "rope_and_write_kv" else {op}
            with force_reference(set(OPS) - on):
                alone, _, _ = _run(llm, prompts, tokens)
            rows += _compare(dtype, f"only {op}", prompts, alone, reference, ref_margins)
    del llm
    torch.cuda.empty_cache()
    return {"rows": rows, **walls}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    runs = {
        "fp32": check("float32", args.tokens, attribute=False),
        "bf16": check("bfloat16", args.tokens, attribute=True),
    }
    rows = [r for run in runs.values() for r in run["rows"]]
    cols = ["dtype", "kernels", "prompt_len", "tokens", "identical", "first_diff", "margin_at_diff", "min_margin"]
    print_table(rows, cols)
    for name, run in runs.items():
        walls = ", ".join(f"{k.removeprefix('wall_s_')} {v:.2f}s" for k, v in run.items() if k.startswith("wall_s_"))
        print(f"{name}: generate wall time: {walls}")
    fp32 = [r for r in runs["fp32"]["rows"] if r["kernels"] == "all"]
    bf16 = [r for r in runs["bf16"]["rows"] if r["kernels"] == EXACT]
    controls = [r for run in runs.values() for r in run["rows"] if r["kernels"].startswith("none")]
    ok = all(r["identical"] for r in fp32 + bf16 + controls)
    print("fp32 (all kernels) and bf16 (exact attention) identical to the references:", ok)
    save_result(
        "model-check",
        {"runs": runs, "fp32_and_bf16_exact_identical": ok, "shape": "llama-3.1-8b"},
        [args.out],
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
