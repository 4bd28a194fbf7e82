"""Offline throughput of one engine as a tp x pp worker group (random weights of a real shape).

    python -m bench.parallel_groups --shapes 1x1,2x1,1x2,2x2 [--out DIR]      # GPU, Llama-3.1-8B, bf16
    python -m bench.parallel_groups --quick                                    # CPU smoke run, tiny shape

Per group shape (tp x pp): ``LLM(tensor_parallel_size=tp, pipeline_parallel_size=pp)`` runs a
batch of ``--batch`` prompts of ``--input-len`` tokens for ``--output-len`` tokens each
(``ignore_eos``). ``prefill_s`` is the time to the batch's first tokens (one token each),
``decode_tok_s`` the rate of the remaining tokens, ``kv_blocks`` the blocks each rank's pool holds
(a sharded rank holds fewer heads or layers per block, so more blocks). The first generate of a
group warms it up and is not timed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, save_result
from bench.shapes import model_dir
from engine import LLM, SamplingParams

COLS = ["tp", "pp", "batch", "input_len", "output_len", "kv_blocks", "prefill_s", "decode_tok_s", "total_s"]


def run_shape(folder: Path, tp: int, pp: int, args: argparse.Namespace) -> dict[str, Any]:
    prompts = [[(7 * i + j) % 1000 + 3 for j in range(args.input_len)] for i in range(args.batch)]
    first = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    full = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    with LLM(
        str(folder), random_weights=True, dtype=args.dtype, device=args.device, tensor_parallel_size=tp,
        pipeline_parallel_size=pp, max_num_seqs=args.batch, max_num_batched_tokens=args.max_batched_tokens,
        kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=False,
    ) as llm:
        llm.generate(prompts[:2], first)  # warm-up
        t0 = time.perf_counter()
        llm.generate(prompts, first)
        t1 = time.perf_counter()
        llm.generate(prompts, full)
        t2 = time.perf_counter()
        blocks = llm.engine.layout.num_blocks
    prefill = t1 - t0
    decode_tokens = args.batch * (args.output_len - 1)
    return {"tp": tp, "pp": pp, "batch": args.batch, "input_len": args.input_len, "output_len": args.output_len,
            "kv_blocks": blocks, "prefill_s": prefill, "decode_tok_s": decode_tokens / max(t2 - t1 - prefill, 1e-9),
            "total_s": t2 - t1}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.parallel_groups", description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="1x1,2x1,1x2,2x2", help="tp x pp group shapes, comma-separated")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-batched-tokens", type=int, default=4096)
    ap.add_argument("--kv-cache-memory", type=int, default=8 * 2**30)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run of the plumbing (tiny shape)")
    ap.add_argument("--out", type=Path, action="append", default=[])
    args = ap.parse_args()
    if args.quick:
        args.model, args.device, args.dtype, args.shapes = "llama-tiny", "cpu", "float32", "1x1,2x1,1x2"
        args.batch, args.input_len, args.output_len, args.kv_cache_memory = 4, 32, 8, 64 * 2**20
        args.max_batched_tokens = 256
    folder = model_dir(args.model)
    rows = []
    for shape in args.shapes.split(","):
        tp, pp = (int(x) for x in shape.lower().split("x"))
        rows.append(run_shape(folder, tp, pp, args))
        print(f"{tp}x{pp} done: {rows[-1]['decode_tok_s']:.1f} decode tok/s", flush=True)
    print()
    print_table(rows, COLS)
    if not args.quick:
        path = save_result("parallel-groups", {"model": args.model, "dtype": args.dtype, "rows": rows}, args.out)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
