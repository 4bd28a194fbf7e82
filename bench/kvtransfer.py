"""KV push bandwidth between two processes, per transport and device.

    python -m bench.kvtransfer --backend nixl --device cuda [--blocks 256] [--iters 10]
    python -m bench.kvtransfer --backend nixl,ucxx,mpi,nccl,tcp --device cuda   # one table
    python -m bench.kvtransfer --backend tcp,ucxx,mpi --device cpu --quick       # CI smoke run

Several backends run one after the other on the same block layout; one that cannot run here
(package missing, nccl without GPUs) is listed with the reason instead of failing the run.
``mpi`` runs its two sides as ranks of one ``mpiexec`` job (`bench.kvtransfer_mpi`).
``--quick`` pushes a few blocks twice and writes JSON only where ``--json`` says.

Layout of Llama-3.1-8B (32 layers, 8 KV heads, d=128, blocks of 16 tokens, bf16): one block
is 64 KiB per layer, 2 MiB across layers. A prefill process (this one) pushes ``--blocks``
blocks into a decode process's pool, the way a finished prompt is handed over, in two modes:

* ``all``: one `write_blocks` over every layer (one descriptor per run per layer);
* ``layerwise``: one `write_blocks` per layer, as prefill issues them while computing, then
  a notification once all are done.

Source blocks are laid out in runs of ``--run-length`` consecutive ids (0: fully contiguous),
destination ids are the same runs shuffled, so fragmentation is part of what is measured.
The destination bytes are checked against the source after the timed loop.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, save_result
from engine.kv_cache_pool import KVCachePool, KVLayout
from kvtransfer import TransportOptions, create_transport

TOKEN = "bench-token"
COMPAT = {"model": "llama-3.1-8b-shape", "tp_rank": 0, "tp_size": 1}


def llama8b_layout(num_blocks: int) -> KVLayout:
    return KVLayout(num_layers=32, num_blocks=num_blocks, num_kv_heads=8, block_size=16, head_dim=128,
                    dtype=torch.bfloat16)


def _device(kind: str, index: int) -> str:
    return f"cuda:{index}" if kind == "cuda" else "cpu"


def receiver(backend: str, device: str, num_blocks: int, conn: Connection) -> None:
    """Decode side: register a pool, hand out metadata, serve until told to stop, report checksums."""
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    pool = KVCachePool(llama8b_layout(num_blocks), device)
    transport = create_transport(backend, "bench-decode", TransportOptions(token=TOKEN))
    transport.register_pool(pool, COMPAT)
    conn.send(transport.metadata())
    transport.add_peer(conn.recv())
    notes = 0
    while not conn.poll(0.001):
        notes += len(transport.poll_notifications())
    blocks, expected = conn.recv()
    deadline = time.monotonic() + 5  # notify() is asynchronous: the last one may still be in flight
    while notes < expected and time.monotonic() < deadline:
        notes += len(transport.poll_notifications())
    conn.send((checksum(pool.kv[:, blocks]), notes))
    transport.close()


def checksum(x: torch.Tensor) -> tuple[float, float]:
    x = x.float()
    return x.sum().item(), x.abs().sum().item()


def block_ids(n: int, run: int, num_blocks: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    src = np.arange(n)
    if run <= 0:
        return src, np.arange(n) + (num_blocks - n)  # one run, at another offset
    starts = np.arange(0, n, run)
    order = rng.permutation(len(starts))
    dst = np.concatenate([np.arange(s, min(s + run, n)) for s in starts[order]])
    return src, dst


def run(args: argparse.Namespace, conn: Any = None) -> dict[str, Any]:
    """Time the pushes; the receiver is a spawned process, or the rank behind ``conn`` (mpi)."""
    src_device = _device(args.device, args.src_index)
    dst_device = _device(args.device, args.dst_index)
    num_blocks = args.blocks + 16
    proc = None
    if conn is None:
        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=receiver, args=(args.backend, dst_device, num_blocks, child), daemon=True)
        proc.start()
    if src_device.startswith("cuda"):
        torch.cuda.set_device(torch.device(src_device))
    pool = KVCachePool(llama8b_layout(num_blocks), src_device)
    pool.kv.normal_()
    transport = create_transport(args.backend, "bench-prefill", TransportOptions(token=TOKEN))
    transport.register_pool(pool, COMPAT)
    conn.send(transport.metadata())
    peer = transport.add_peer(conn.recv())
    src, dst = block_ids(args.blocks, args.run_length, num_blocks, np.random.default_rng(0))
    layers = pool.layout.num_layers

    def push_all() -> int:
        h = transport.write_blocks(peer, src, dst, notify=b"done")
        transport.wait(h, args.timeout)
        return h.num_descriptors

    def push_layerwise() -> int:
        handles = [transport.write_blocks(peer, src, dst, layers=[i]) for i in range(layers)]
        for h in handles:
            transport.wait(h, args.timeout)
        transport.notify(peer, b"done")
        return sum(h.num_descriptors for h in handles)

    nbytes = args.blocks * layers * pool.layout.block_bytes_per_layer
    rows = []
    for mode, fn in (("all", push_all), ("layerwise", push_layerwise)):
        if args.mode not in ("both", mode):
            continue
        descs = fn()  # warm-up: connections, registration caches
        times = []
        for i in range(args.iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            print(f"  {mode:9s} iter {i + 1}/{args.iters}: {times[-1] * 1e3:8.2f} ms "
                  f"{nbytes / times[-1] / 1e9:7.2f} GB/s", flush=True)
        rows.append({
            "mode": mode, "blocks": args.blocks, "bytes": nbytes, "descriptors": descs,
            "median_ms": statistics.median(times) * 1e3, "best_ms": min(times) * 1e3,
            "median_GBps": nbytes / statistics.median(times) / 1e9, "best_GBps": nbytes / min(times) / 1e9,
        })
    conn.send((dst.tolist(), len(rows) * (args.iters + 1)))
    remote_sum, notes = conn.recv()
    local_sum = checksum(pool.kv[:, torch.as_tensor(src)])
    ok = all(abs(a - b) <= 1e-5 * local_sum[1] for a, b in zip(remote_sum, local_sum))
    transport.close()
    if proc is not None:
        proc.join(30)
    print_table(rows, ["mode", "blocks", "descriptors", "median_ms", "best_ms", "median_GBps", "best_GBps"])
    print(f"destination checksum {'matches' if ok else 'DIFFERS'}; notifications received: {notes}")
    if not ok:
        raise SystemExit("destination bytes differ from the source")
    return {
        "backend": args.backend, "transfer_device": args.device, "src": src_device, "dst": dst_device,
        "layout": "llama-3.1-8b (32 layers, 8 kv heads, d=128, block 16, bf16)",
        "block_bytes_per_layer": pool.layout.block_bytes_per_layer, "run_length": args.run_length,
        "iters": args.iters, "rows": rows, "checksum_ok": ok, "notifications": notes,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="nixl", help="a backend or a comma-separated list")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", choices=["cpu", "cuda"], default=default_device)
    p.add_argument("--blocks", type=int, default=256, help="blocks pushed per request (x16 tokens)")
    p.add_argument("--run-length", type=int, default=0, help="consecutive ids per run; 0 = one run")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--mode", choices=["all", "layerwise", "both"], default="both")
    p.add_argument("--src-index", type=int, default=0, help="CUDA device of the sender")
    p.add_argument("--dst-index", type=int, default=0, help="CUDA device of the receiver")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--quick", action="store_true", help="smoke run: 4 blocks, 2 iterations, no bench/results file")
    p.add_argument("--json", type=Path, help="also write the combined result here")
    p.add_argument("--out", type=Path, action="append", default=[], help="extra folder for the JSON")
    p.add_argument("--commit", help="record this commit (a device copy of the tree has no .git)")
    args = p.parse_args(argv)
    if args.quick:
        args.blocks, args.iters = min(args.blocks, 4), min(args.iters, 2)
    return args


def run_backend(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """One backend's result, or ``{"backend", "skipped": reason}`` when it cannot run here."""
    from kvtransfer.errors import KVTransferError

    try:
        if args.backend == "mpi":
            from bench.kvtransfer_mpi import run_pair

            return run_pair([*argv, "--backend", "mpi"], timeout=args.timeout * 4)
        return run(args)
    except (KVTransferError, ImportError, RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"  {args.backend}: skipped ({exc})", flush=True)
        return {"backend": args.backend, "skipped": str(exc).splitlines()[0]}


def main() -> None:
    args = parse_args()
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    argv = [a for a in sys.argv[1:]]
    argv = [a for i, a in enumerate(argv) if a != "--backend" and (i == 0 or argv[i - 1] != "--backend")]
    results = []
    for backend in backends:
        print(f"kvtransfer bench: {backend} on {args.device}, {args.blocks} blocks "
              f"({args.blocks * 2} MiB per push)", flush=True)
        results.append(run_backend(argparse.Namespace(**{**vars(args), "backend": backend}), argv))
    summary = [{"backend": r["backend"], "mode": row["mode"], "median_GBps": row["median_GBps"],
                "best_GBps": row["best_GBps"], "descriptors": row["descriptors"]}
               for r in results for row in r.get("rows", [])]
    print_table(summary, ["backend", "mode", "descriptors", "median_GBps", "best_GBps"])
    for r in results:
        if "skipped" in r:
            print(f"{r['backend']}: skipped ({r['skipped']})")
    payload = {"backends": backends, "device": args.device, "blocks": args.blocks, "results": results}
    if args.commit:
        payload["commit"] = args.commit
    if args.json is not None:
        args.json.write_text(json.dumps(payload, indent=1))
    if not args.quick:
        path = save_result(f"kvtransfer-{'-'.join(backends)}-{args.device}", payload, args.out)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
