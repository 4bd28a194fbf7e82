"""The Ray commands' arguments (``splitserve up/scale/status/down``); imports no Ray, so
``splitserve --help`` stays fast and works where Ray is not installed."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _up(args: argparse.Namespace) -> int:
    from cluster.config import ConfigError
    from splitserve.launch_options import parse_set
    from splitserve.ray_deploy.commands import up

    try:
        overrides = parse_set(args.set or [])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    options: dict[str, Any] = {"router_replicas": args.router_replicas}
    if args.accelerator:
        options["accelerator"] = args.accelerator
    if args.per_rank != 1.0:
        if not 0 < args.per_rank <= 1:
            print(f"error: --per-rank: must be in (0, 1], got {args.per_rank:g}", file=sys.stderr)
            return 2
        options["per_rank"] = args.per_rank
    return up(args.config, address=args.address, overrides=overrides, dry_run=args.dry_run, options=options)


def _scale(args: argparse.Namespace) -> int:
    from splitserve.ray_deploy.commands import scale

    if args.prefill is None and args.decode is None:
        print("error: give --prefill N and/or --decode M", file=sys.stderr)
        return 2
    return scale(args.prefill, args.decode, address=args.address, wait=not args.no_wait)


def _status(args: argparse.Namespace) -> int:
    from splitserve.ray_deploy.commands import status

    return status(address=args.address)


def _down(args: argparse.Namespace) -> int:
    from splitserve.ray_deploy.commands import down

    return down(address=args.address, stop_ray=args.stop_ray)


def add_commands(sub: Any) -> None:
    """Add ``up``, ``scale``, ``status`` and ``down`` to the ``splitserve`` subparsers."""
    address = dict(help="Ray cluster: auto (this machine's) or ray://HOST:10001 (default: auto)")
    u = sub.add_parser("up", help="deploy a cluster config on Ray Serve (starts a local Ray if none runs)")
    u.add_argument("config", nargs="?", help="cluster YAML (default: the embedded SmolLM2 on CPU)")
    u.add_argument("--address", **address)
    u.add_argument("--dry-run", action="store_true", help="print the Serve config (serve deploy / RayService)")
    u.add_argument("--router-replicas", type=int, default=1, help="router (ingress) replicas (default 1)")
    u.add_argument("--accelerator", help="resource reserved per rank (default GPU on cuda, CPU on cpu)")
    u.add_argument("--per-rank", type=float, default=1.0,
                   help="share of an accelerator each rank reserves (0.5: a prefill and a decode replica share a GPU)")
    u.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config field (repeatable)")
    u.set_defaults(func=_up)
    s = sub.add_parser("scale", help="resize the pools of the deployed cluster, live")
    s.add_argument("--prefill", type=int, help="prefill replicas")
    s.add_argument("--decode", type=int, help="decode replicas")
    s.add_argument("--no-wait", action="store_true", help="return before the new size is running")
    s.add_argument("--address", **address)
    s.set_defaults(func=_scale)
    st = sub.add_parser("status", help="pools, replicas, nodes, load of the deployed cluster")
    st.add_argument("--address", **address)
    st.set_defaults(func=_status)
    d = sub.add_parser("down", help="remove everything `up` deployed")
    d.add_argument("--address", **address)
    d.add_argument("--stop-ray", action="store_true", help="also `ray stop` the local Ray head")
    d.set_defaults(func=_down)
