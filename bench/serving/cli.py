"""``splitserve bench`` / ``python -m bench.serving``: load an OpenAI-compatible endpoint, report.

    splitserve bench --base-url http://127.0.0.1:8000 --num-prompts 200 --input-len 512 \\
        --output-len 128 --request-rate 8 --goodput ttft:1000 tpot:40 --out bench/results/x.json
    splitserve bench --compare before.json after.json

Exit status: 0 when every measured request succeeded, 1 when some failed (the report says which
and why) or the warm-up never got an answer, 2 for bad arguments or a server that cannot be asked
for its model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from bench.serving.arrivals import ArrivalError, Arrivals
from bench.serving.metrics import GoodputError, parse_goodput, summarize
from bench.serving.report import ResultFileError, build_result, format_compare, format_summary, load_result, save_result
from bench.serving.workload import WorkloadError, parse_length


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench flags, on ``p`` (also used by the ``splitserve bench`` subparser)."""
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (a trailing /v1 is fine)")
    p.add_argument("--model", help="model name to request (default: the first of GET /v1/models)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--api-key", help="sent as a Bearer token")
    p.add_argument("--tokenizer", help="tokenizer folder or .gguf of the served model (default: embedded SmolLM2)")
    w = p.add_argument_group("workload")
    w.add_argument("--num-prompts", type=int, default=100, help="measured requests (default 100)")
    for name, default in (("input", 128), ("output", 128)):
        w.add_argument(f"--{name}-len", type=int, help=f"{name} tokens per request (default {default})"
                       + ("; counted as the model sees them, chat template included" if name == "input" else ""))
        w.add_argument(f"--{name}-len-range", metavar="A:B", help=f"{name} tokens uniform in [A, B]")
        w.add_argument(f"--{name}-len-std", type=float, metavar="S", help=f"{name} tokens normal around --{name}-len")
    w.add_argument("--shared-prefix", type=int, default=0, metavar="P", help="prompts share a P-token prefix")
    w.add_argument("--num-groups", type=int, default=1, metavar="G", help="distinct shared prefixes (default 1)")
    w.add_argument("--seed", type=int, default=0, help="seeds prompts, lengths and Poisson arrivals")
    w.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly the requested output tokens (default on)")
    w.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    w.add_argument("--extra-body", type=json.loads, default={}, metavar="JSON", help="merged into every request")
    w.add_argument("--include-usage", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for stream usage (else output tokens are counted with the tokenizer)")
    a = p.add_argument_group("load")
    a.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (default: all at once)")
    a.add_argument("--arrival", choices=("poisson", "constant"), default="poisson",
                   help="gaps between sends at --request-rate (default poisson)")
    a.add_argument("--concurrency", type=int, help="at most this many requests in flight")
    a.add_argument("--warmup", type=int, default=2, help="unrecorded requests sent first (default 2)")
    a.add_argument("--duration", type=float,
                   help="stop sending after this many seconds (the run also ends once --num-prompts are sent)")
    a.add_argument("--timeout", type=float, default=600.0, help="per-request limit in seconds")
    o = p.add_argument_group("output")
    o.add_argument("--goodput", nargs="+", default=[], metavar="KEY:MS", help="targets, e.g. ttft:1000 tpot:40")
    o.add_argument("--out", help="write the results JSON here")
    o.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print two results side by side")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_command(args: argparse.Namespace) -> int:
    """The ``bench`` command on parsed ``args``."""
    if args.compare:
        try:
            a, b = (load_result(path) for path in args.compare)
        except ResultFileError as e:
            return _fail(str(e))
        print(format_compare(a, b, args.compare))
        return 0
    try:
        plan = _plan(args)
    except (WorkloadError, ArrivalError, GoodputError, ValueError) as e:
        return _fail(str(e))
    return _bench(args, plan)


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    """Everything checkable before touching the network, so bad flags fail in a second."""
    if args.num_prompts < 1 or args.warmup < 0 or (args.duration is not None and args.duration <= 0):
        raise ValueError("--num-prompts must be >= 1, --warmup >= 0 and --duration > 0")
    if args.timeout <= 0:
        raise ValueError("--timeout must be > 0")
    if not isinstance(args.extra_body, dict):
        raise ValueError("--extra-body must be a JSON object")
    return {
        "inputs": parse_length(args.input_len, args.input_len_range, args.input_len_std, 128, "input"),
        "outputs": parse_length(args.output_len, args.output_len_range, args.output_len_std, 128, "output"),
        "arrivals": Arrivals(args.request_rate, args.arrival, args.concurrency, args.seed),
        "goodput": parse_goodput(args.goodput),
        "base_url": _base_url(args.base_url),
    }


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _bench(args: argparse.Namespace, plan: dict[str, Any]) -> int:
    try:
        from bench.serving.session import BenchSession, SessionError
    except ModuleNotFoundError as e:  # httpx ships with the dev extras; --compare does not need it
        return _fail(f"running a benchmark needs the {e.name!r} package (pip install {e.name})")
    try:
        session = BenchSession.open(args, plan)
        outcome = asyncio.run(session.run())
    except (SessionError, WorkloadError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted", code=130)
    if not outcome.records:
        first = next((r.error for r in outcome.warmup if r.error), "no answer")
        return _fail(f"every warm-up request failed, not starting the run: {first}", code=1)
    summary = summarize(outcome.records, outcome.duration_s, plan["goodput"])
    result = build_result(session.config(), summary, outcome.records)
    print(format_summary(result))
    if args.out:
        print(f"results: {save_result(result, args.out)}")
    return 0 if summary["failed"] == 0 else 1


def _fail(message: str, code: int = 2) -> int:
    print(f"splitserve bench: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitserve bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_command(parser.parse_args(argv))
