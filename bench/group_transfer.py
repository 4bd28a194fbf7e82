"""KV transfer between worker groups of different tp/pp: what a split pairing costs on the wire.

    python -m bench.group_transfer --backend tcp,ucxx --device cuda      # GPU, Llama-3.1-8B KV geometry
    python -m bench.group_transfer --quick                                # CPU smoke run, tiny geometry

For each pairing (prefill tp x pp -> decode tp x pp) every rank gets its own transport and pool
(one process, one transport per rank, each rank's pool on ``cuda:<rank % GPUs>``). A prompt's
``--blocks`` blocks move layer by layer, every prefill rank writing each decode rank the
intersection of their heads and layers (`kvtransfer.group_slices`), all ranks' writes in flight
together. ``descriptors`` is the ranges posted, ``GB/s`` the model's KV bytes over the wall time
of one prompt's push (best of ``--repeats``). The destination is checked against the source.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, save_result
from engine.kv_cache_pool import KVCachePool, KVLayout
from kvtransfer import create_transport
from kvtransfer.base import KVTransport, TransportOptions
from kvtransfer.group_slices import GroupShape, pieces, slice_ranges

COLS = ["backend", "prefill", "decode", "pieces", "descriptors", "MiB", "ms", "GB/s", "ok"]
Ranks = list[tuple[KVTransport, KVCachePool]]


def start(g: GroupShape, name: str, blocks: int, backend: str, device: str) -> Ranks:
    out = []
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    for r in range(g.world_size):
        s = g.rank_slice(r)
        dev = f"cuda:{r % gpus}" if gpus else "cpu"
        layout = KVLayout(len(s.layers), blocks, len(s.heads), g.block_size, g.head_dim, getattr(torch, g.dtype))
        pool = KVCachePool(layout, dev)
        t = create_transport(backend, f"{name}-{r}", TransportOptions(token="bench"))
        t.register_pool(pool, {"model": "bench"}, group=True)
        out.append((t, pool))
    return out


def run_pairing(backend: str, pg: GroupShape, dg: GroupShape, args: argparse.Namespace) -> dict[str, Any]:
    nb = args.blocks + 8
    whole = torch.randn(pg.num_layers, nb, 2, pg.num_kv_heads, pg.block_size, pg.head_dim).to(getattr(torch, pg.dtype))
    prefill, decode = start(pg, "p", nb, backend, args.device), start(dg, "d", nb, backend, args.device)
    try:
        for r, (_, pool) in enumerate(prefill):
            s = pg.rank_slice(r)
            pool.kv.copy_(whole[s.layers.start:s.layers.stop, :, :, s.heads.start:s.heads.stop])
        pairs = pieces(pg, dg)
        for s_rank, d_rank in pairs:
            prefill[s_rank][0].add_peer(decode[d_rank][0].metadata())
        local, remote = np.arange(args.blocks), np.arange(8, 8 + args.blocks)
        best, descriptors = float("inf"), 0
        for _ in range(args.repeats):
            t0, handles, descriptors = time.perf_counter(), [], 0
            for layer in range(pg.num_layers):  # as the layers finish, every rank writes its slices
                for s_rank, d_rank in pairs:
                    ranges = slice_ranges(pg, s_rank, dg, d_rank, local, remote, np.array([layer]), nb, nb)
                    if len(ranges):
                        t = prefill[s_rank][0]
                        handles.append((t, t.write_ranges(decode[d_rank][0].agent_name, ranges)))
                        descriptors += len(ranges)
            for t, h in handles:
                t.wait(h, 60.0)
            best = min(best, time.perf_counter() - t0)
        ok = all(torch.equal(pool.kv[:, 8:8 + args.blocks].cpu(),
                             whole[dg.rank_slice(d).layers.start:dg.rank_slice(d).layers.stop, :args.blocks, :,
                                   dg.rank_slice(d).heads.start:dg.rank_slice(d).heads.stop])
                 for d, (_, pool) in enumerate(decode))
    finally:
        for t, _ in prefill + decode:
            t.close()
    nbytes = whole[:, :args.blocks].numel() * whole.element_size()
    return {"backend": backend, "prefill": f"{pg.tp}x{pg.pp}", "decode": f"{dg.tp}x{dg.pp}", "pieces": len(pairs),
            "descriptors": descriptors, "MiB": nbytes / 2**20, "ms": 1e3 * best, "GB/s": nbytes / best / 1e9, "ok": ok}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.group_transfer", description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="tcp", help="comma-separated: tcp, ucxx")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--pairings", default="1x1-1x1,1x1-2x1,2x1-1x1,2x1-4x1,1x2-2x1,2x2-4x1",
                    help="prefill tp x pp - decode tp x pp, comma-separated")
    ap.add_argument("--blocks", type=int, default=64, help="blocks of one prompt (block_size tokens each)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny geometry (4 layers, 4 KV heads, head_dim 32)")
    ap.add_argument("--out", type=Path, action="append", default=[], help="also copy the JSON here")
    args = ap.parse_args()
    geo = (4, 4, 32, 16, "float32") if args.quick else (32, 8, 128, 16, "bfloat16")  # Llama-3.1-8B's KV
    rows = []
    for backend in args.backend.split(","):
        for pairing in args.pairings.split(","):
            (ptp, ppp), (dtp, dpp) = ([int(x) for x in side.split("x")] for side in pairing.split("-"))
            pg, dg = GroupShape(ptp, ppp, *geo), GroupShape(dtp, dpp, *geo)
            rows.append(run_pairing(backend, pg, dg, args))
    print_table(rows, COLS)
    path = save_result("group-transfer", {"geometry": geo, "blocks": args.blocks, "rows": rows}, args.out)
    print(f"wrote {path}")
    if not all(r["ok"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
