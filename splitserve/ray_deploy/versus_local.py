"""``python -m splitserve.ray_deploy.versus_local CONFIG``: the same load against ``splitserve up`` (Ray Serve) and
``splitserve serve`` (local processes), TTFT / TPOT p50 side by side.

What Ray adds on the request path is Serve's HTTP proxy in front of the router (the router ->
worker -> KV path is the same code), so the difference is the proxy hop plus any placement
effect. Both runs use `bench.serving` (the ``splitserve bench`` machinery) with the same seed,
one after the other on the same machines; the JSON goes to ``bench/results/ray-vs-local-*.json``.

    python -m splitserve.ray_deploy.versus_local deploy/local.yaml \
        --num-prompts 8 --input-len 64 --output-len 8   # CPU smoke
    python -m splitserve.ray_deploy.versus_local deploy/ray-2node.yaml --address auto --num-prompts 400 --request-rate 8

Without ``--address`` Ray runs inside this process (and ends with it). ``--per-rank 0.5`` lets a
prefill and a decode replica share one GPU (what `splitserve up --per-rank` reserves per rank).
It lives beside the Ray commands, not in ``bench/``, because it drives `splitserve` itself and
``bench`` may not import `splitserve` (the CLI imports ``bench.serving``: the package graph stays acyclic).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import print_table, save_result
from cluster.config import load_config
from cluster.redis_server import free_port

SHOWN = (("ttft_ms", "p50"), ("tpot_ms", "p50"), ("e2e_ms", "p50"))


@contextmanager
def local_target(config_path: str, port: int) -> Iterator[str]:
    """``splitserve serve`` in this process: the router's base URL while the block runs."""
    from splitserve.serve import LocalCluster

    with LocalCluster(load_config(config_path), router_port=port) as cluster:
        yield cluster.url


@contextmanager
def ray_target(config_path: str, port: int, address: str | None, per_rank: float = 1.0) -> Iterator[str]:
    """``splitserve up`` (then ``down``): Serve's proxy URL while the block runs."""
    import os

    import ray

    from splitserve.ray_deploy import NAMESPACE
    from splitserve.ray_deploy.commands import down, up

    if address is None and not ray.is_initialized():
        ray.init(num_cpus=max(8, os.cpu_count() or 1), namespace=NAMESPACE, log_to_driver=False)
    options: dict[str, Any] = {"proxy_location": "HeadOnly", "per_rank": per_rank}
    if up(config_path, address=address, overrides={"router.port": port}, options=options, out=sys.stderr) != 0:
        raise SystemExit("splitserve up failed")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        down(out=io.StringIO())


def run_load(base_url: str, bench_args: Sequence[str]) -> dict[str, Any]:
    """One `bench.serving` run against ``base_url``; its result JSON."""
    from bench.serving.cli import main as bench_main

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        code = bench_main(["--base-url", base_url, "--no-progress", "--out", str(out), *bench_args])
        if not out.exists():
            raise SystemExit(f"the load against {base_url} did not run (exit {code})")
        return dict(json.loads(out.read_text()))


def compare(config_path: str, bench_args: Sequence[str], address: str | None = None,
            targets: Sequence[str] = ("local", "ray"), per_rank: float = 1.0) -> dict[str, Any]:
    """Run the load against each target in turn; the summaries keyed by target."""
    makers: dict[str, Callable[[int], Any]] = {
        "local": lambda port: local_target(config_path, port),
        "ray": lambda port: ray_target(config_path, port, address, per_rank),
    }
    out: dict[str, Any] = {}
    for name in targets:
        with makers[name](free_port()) as url:
            out[name] = run_load(url, bench_args)["summary"]
    return out


def table(summaries: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, s in summaries.items():
        row: dict[str, Any] = {"target": name, "completed": s["completed"], "failed": s["failed"]}
        for metric, q in SHOWN:
            row[f"{metric.removesuffix('_ms')} {q} ms"] = s[metric][q]
        row["out tok/s"] = s["output_throughput"]
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m splitserve.ray_deploy.versus_local", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="cluster YAML, served both ways")
    p.add_argument("--address", help="Ray cluster for the `up` run (default: Ray inside this process)")
    p.add_argument("--per-rank", type=float, default=1.0,
                   help="accelerator share each rank reserves under Ray (0.5: two replicas share a GPU)")
    p.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args, bench_args = p.parse_known_args(argv)  # the rest are `splitserve bench` flags
    summaries = compare(args.config, bench_args, args.address, per_rank=args.per_rank)
    rows = table(summaries)
    print_table(rows, list(rows[0]))
    if not args.no_save:
        path = save_result("ray-vs-local", {"config": args.config, "bench_args": list(bench_args),
                                            "per_rank": args.per_rank,
                                            "table": rows, "summaries": summaries})
        print(f"results: {path}")
    return 0 if all(s["failed"] == 0 for s in summaries.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
