"""The `splitserve` command line.

    splitserve models pull            fetch + convert the embedded SmolLM2 model, print its folder
    splitserve generate "prompt"      offline generation with the engine (one process)
    splitserve serve [--config FILE] [--host H] [--port P] [--model M] [--api-key K] [--set K=V] [--quiet]
                                      the local disaggregated cluster behind the router
    splitserve up CONFIG [--address auto|ray://HOST:10001] [--dry-run]
                                      the cluster on Ray Serve (docs/ray.md); also scale, status, down
    splitserve --version
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from splitserve import __version__


def _cmd_pull(args: argparse.Namespace) -> int:
    from engine.model_store import pull_default_model

    path = pull_default_model(progress=True)
    print(path)  # the one line on stdout: `$(splitserve models pull)` is the folder
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from bench.serving.cli import run_command

    return run_command(args)


def _cmd_generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams
    from engine.errors import SplitserveError
    from engine.model_store import ensure_default_model

    model = args.model or str(ensure_default_model())
    try:
        llm = LLM(model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len)
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
        )
        prompts = args.prompt or ["What is the capital of France?"]
        inputs = [p if args.raw else [{"role": "user", "content": p}] for p in prompts]
        outs = llm.generate(inputs, params)
    except SplitserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt, out in zip(prompts, outs):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason}))
        else:
            print(f">>> {prompt}\n{out.text}\n[{out.finish_reason}, {len(out.token_ids)} tokens]")
    return 0


def _serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Flags as dotted config paths; ``--set`` first, so the named flags win over it."""
    from splitserve.launch_options import parse_set

    overrides = parse_set(args.set or [])
    named = {"router.host": args.host, "router.port": args.port, "model": args.model}
    overrides.update({k: v for k, v in named.items() if v is not None})
    if args.api_key:
        overrides["router.api_keys"] = list(args.api_key)
    if args.quiet:
        overrides["router.log_requests"] = False
    return overrides


def _cmd_serve(args: argparse.Namespace) -> int:
    from cluster.config import ConfigError
    from splitserve.serve import serve

    try:
        overrides = _serve_overrides(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return serve(args.config, overrides, launcher=args.launcher)


def _cmd_worker(args: argparse.Namespace) -> int:
    from cluster.config import ConfigError
    from splitserve.launch_options import parse_set
    from splitserve.mpi_worker import run_worker

    try:
        overrides = parse_set(args.set or [])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_worker(args.config, overrides, args.rank)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitserve", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--version", action="version", version=f"splitserve {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="manage local models")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("pull", help="fetch the embedded SmolLM2-135M-Instruct model").set_defaults(func=_cmd_pull)

    from bench.serving import cli as bench_cli

    b = sub.add_parser("bench", help="load-test an OpenAI-compatible endpoint (TTFT, TPOT, ITL, goodput)",
                       description=bench_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_cli.add_arguments(b)
    b.set_defaults(func=_cmd_bench)

    g = sub.add_parser("generate", help="generate offline with the engine")
    g.add_argument("prompt", nargs="*", help="user messages (chat template applied unless --raw)")
    g.add_argument("--model", help="HF model folder or .gguf (default: the embedded SmolLM2)")
    g.add_argument("--raw", action="store_true", help="send prompts as plain text, no chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", default="float32")
    g.add_argument("--device", default="cpu")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    g.set_defaults(func=_cmd_generate)

    s = sub.add_parser("serve", help="run the local cluster behind an OpenAI-compatible router")
    s.add_argument("--config", help="cluster YAML (default: the embedded SmolLM2 on this machine)")
    s.add_argument("--host", help="router bind address (router.host; default 127.0.0.1)")
    s.add_argument("--port", type=int, help="router port (router.port; default 8000, 0: a free one)")
    s.add_argument("--model", help="HF model folder or .gguf file (model; default: the embedded SmolLM2)")
    s.add_argument("--api-key", action="append", metavar="KEY",
                   help="accepted bearer token (router.api_keys; repeat for several)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any config field, e.g. --set decode.max_num_seqs=32 (repeatable)")
    s.add_argument("--quiet", action="store_true", help="no per-request log line (router.log_requests: false)")
    s.add_argument("--launcher", choices=["local", "mpi"], default="local",
                   help="local: a process per worker; mpi: every worker a rank of one mpiexec job")
    s.set_defaults(func=_cmd_serve)
    w = sub.add_parser("worker", help="run the worker of this MPI rank (mpirun -n N splitserve worker --config F)")
    w.add_argument("--config", help="cluster YAML: rank r runs its r-th worker (prefill first, then decode)")
    w.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    w.add_argument("--rank", type=int, help="the worker index, outside an MPI job")
    w.set_defaults(func=_cmd_worker)

    from splitserve.ray_deploy import cli as ray_cli  # up / scale / status / down

    ray_cli.add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
