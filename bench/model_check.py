"""GPU: the whole model with Triton kernels vs with the torch reference twins.

Random-weight Llama-3.1-8B shape in bf16: greedy tokens must be identical for the first 32
tokens (the kernel issue's acceptance check). Also prints prefill/decode step times.

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
from kernels.ops import force_reference


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    llm = LLM(
        model_dir("llama-3.1-8b"), dtype="bfloat16", device="cuda", random_weights=True,
        num_kv_blocks=2048, max_model_len=4096, max_num_batched_tokens=4096, enable_prefix_caching=False,
    )
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128000, (n,), generator=gen).tolist() for n in (7, 100, 513, 1500)]
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up / JIT
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with_kernels = [o.token_ids for o in llm.generate(prompts, params)]
    torch.cuda.synchronize()
    t_kernels = time.perf_counter() - t0
    with force_reference():
        t0 = time.perf_counter()
        with_reference = [o.token_ids for o in llm.generate(prompts, params)]
        torch.cuda.synchronize()
        t_reference = time.perf_counter() - t0
    rows = []
    for p, a, b in zip(prompts, with_kernels, with_reference):
        first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        rows.append({"prompt_len": len(p), "tokens": len(a), "identical": a == b,
                     "first_diff": first_diff if first_diff is not None else "-"})
    print_table(rows, ["prompt_len", "tokens", "identical", "first_diff"])
    print(f"generate wall time: kernels {t_kernels:.2f}s, reference {t_reference:.2f}s")
    ok = all(r["identical"] for r in rows)
    save_result("model-check", {"rows": rows, "all_identical": ok, "wall_s_kernels": t_kernels,
                                "wall_s_reference": t_reference, "shape": "llama-3.1-8b", "dtype": "bf16"},
                [args.out])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
