"""GPU: one prefill + one decode worker process, a long prompt's KV moved through the transport.

Both workers run a random-weight Llama-3.1-8B-shaped model in bf16 on the same GPU (two
processes), so the KV goes GPU-to-GPU through NIXL (UCX cuda_ipc) exactly as it would between
two GPUs of one host. For each prompt we measure, through the decode worker's real gRPC stream:

- TTFT with disaggregation: decode asks the prefill worker, which pushes each layer's KV as it
  completes and sends the first token with the last layer's write;
- TTFT of the prefill alone: the same prompt run by the decode worker itself (decode-only
  path: same model, same kernels, same gRPC path, no transfer);

and read back from the workers' ``Status``: bytes pushed and the push window (-> GB/s), the
push *tail* after compute (what the transfer adds to TTFT), and the decode hand-over vs one
decode step. Greedy tokens of both paths must agree.

    python -m bench.disagg [--backend nixl] [--prompt-len 4096] [--reps 5] [--decode-device cuda:1] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from pathlib import Path

import torch

from bench.common import print_table, save_result
from bench.shapes import SHAPES, model_dir
from cluster.local_workers import WorkerProcess
from decode_worker.messages import PrefillTarget
from engine.sampling_params import SamplingParams
from protocol.decode_client import DecodeClient
from protocol.prefill_client import PrefillClient
from protocol.worker_spec import WorkerSpec

TOKEN = "bench-token"


def _spec(role: str, model: Path, args: argparse.Namespace) -> WorkerSpec:
    device = args.decode_device if role == "decode" and args.decode_device else args.device
    return WorkerSpec(
        role=role, model=str(model), dtype=args.dtype, device=device, random_weights=True, seed=0,
        block_size=args.block_size, num_kv_blocks=args.num_blocks, max_model_len=2 * args.prompt_len + 64,
        max_num_batched_tokens=args.prompt_len, max_num_seqs=16, transport=args.backend,
        enable_prefix_caching=False,  # every rep computes its whole prompt
        lease_s=30.0, transfer_timeout_s=30.0,
    )


def _ttft(client: DecodeClient, prompt: list[int], params: SamplingParams,
          target: PrefillTarget | None) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    first = 0.0
    tokens: list[int] = []
    for chunk in client.generate(f"bench-{uuid.uuid4().hex[:10]}", prompt, params, prefill=target):
        if not first and chunk.token_ids:
            first = time.perf_counter() - t0
        tokens.extend(chunk.token_ids)
    return first, tokens


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="nixl")
    ap.add_argument("--prompt-len", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=2048)
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--decode-device", default="", help="e.g. cuda:1: the pair on two GPUs")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    args = ap.parse_args()
    model = model_dir(args.shape)
    prefill = WorkerProcess(_spec("prefill", model, args), TOKEN)
    decode = WorkerProcess(_spec("decode", model, args), TOKEN)
    try:
        prefill.spawn()
        decode.spawn()
        prefill.wait_ready(600)
        decode.wait_ready(600)
        vocab = SHAPES[args.shape]["vocab_size"]
        target = PrefillTarget(prefill.worker_id, prefill.address)
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        gen = torch.Generator().manual_seed(1)
        with DecodeClient(decode.address, TOKEN) as client, PrefillClient(prefill.address, TOKEN) as pclient:
            for _ in range(2):  # JIT / autotune / first-contact handshake
                warm = torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()
                _ttft(client, warm, params, target)
                _ttft(client, warm, params, None)
            base_p = pclient.status()
            rows = []
            for i in range(args.reps):
                prompt = torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()
                t_remote, tok_remote = _ttft(client, prompt, params, target)
                t_local, tok_local = _ttft(client, prompt, params, None)
                rows.append({
                    "rep": i, "ttft_disagg_ms": 1e3 * t_remote, "ttft_prefill_alone_ms": 1e3 * t_local,
                    "overhead_pct": 100 * (t_remote / t_local - 1), "same_tokens": tok_remote == tok_local,
                })
            p, d = pclient.status(), client.status()
        nbytes = p.kv_bytes_pushed - base_p.kv_bytes_pushed
        seconds = p.kv_push_seconds - base_p.kv_push_seconds
        print_table(rows, ["rep", "ttft_disagg_ms", "ttft_prefill_alone_ms", "overhead_pct", "same_tokens"])
        med = {k: statistics.median(r[k] for r in rows) for k in ("ttft_disagg_ms", "ttft_prefill_alone_ms")}
        summary = {
            "prompt_len": args.prompt_len,
            "kv_bytes_per_prompt": nbytes // args.reps,
            "descriptors_per_prompt": (p.kv_push_descriptors - base_p.kv_push_descriptors) / args.reps,
            "ttft_disagg_ms_p50": med["ttft_disagg_ms"],
            "ttft_prefill_alone_ms_p50": med["ttft_prefill_alone_ms"],
            "overhead_pct_p50": 100 * (med["ttft_disagg_ms"] / med["ttft_prefill_alone_ms"] - 1),
            "transfer_gbps_push_window": nbytes / seconds / 1e9 if seconds else 0.0,
            "push_window_ms_per_prompt": 1e3 * seconds / args.reps,
            "push_tail_after_compute_ms_p50": p.kv_push_tail_ms_p50,
            "handover_p50_ms": d.handover_p50_ms,
            "handover_max_ms": d.handover_max_ms,
            "decode_step_p50_ms": d.decode_step_p50_ms,
            "all_same_tokens": all(r["same_tokens"] for r in rows),
        }
        for k, v in summary.items():
            print(f"{k:34s} {v:.3f}" if isinstance(v, float) else f"{k:34s} {v}")
        save_result(f"disagg-{args.backend}", {"rows": rows, "summary": summary, "shape": args.shape,
                                                "dtype": args.dtype, "backend": args.backend}, [args.out])
        return 0 if summary["all_same_tokens"] else 1
    finally:
        for w in (decode, prefill):
            code = w.stop()
            if code not in (0, None):
                print(f"{w.spec.role} exited {code}:\n{w.log_tail()}")


if __name__ == "__main__":
    raise SystemExit(main())
