"""One benchmark session: the served model's name and tokenizer resolved, the prompts built.

Everything slow or network-bound before the measured run happens here (loading the tokenizer,
asking ``/v1/models``, building prompts), so the run itself only sends requests; `config` is
what the results file records of it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.serving.arrivals import Arrivals
from bench.serving.client import RequestOptions
from bench.serving.runner import RunOutcome, RunSettings, run
from bench.serving.workload import Prompt, PromptBuilder, build_prompts
from engine.errors import SplitserveError
from engine.tokenizer import Tokenizer, load_tokenizer


class SessionError(RuntimeError):
    """The session cannot start: no tokenizer, or no model name from the server."""


@dataclass
class BenchSession:
    args: argparse.Namespace
    plan: dict[str, Any]
    tokenizer: Tokenizer
    tokenizer_path: str
    model: str
    prompts: list[Prompt]
    warmup: list[Prompt]

    @classmethod
    def open(cls, args: argparse.Namespace, plan: dict[str, Any]) -> BenchSession:
        path = resolve_tokenizer_path(args.tokenizer)
        try:
            tokenizer = load_tokenizer(path)
        except (SplitserveError, OSError, ValueError) as e:
            raise SessionError(f"--tokenizer: {e}") from None
        model = args.model or served_model(plan["base_url"], args.api_key, args.timeout)
        builder = PromptBuilder(tokenizer, args.endpoint, seed=args.seed)
        build = [plan["inputs"], plan["outputs"], args.shared_prefix, args.num_groups]
        prompts = build_prompts(builder, args.num_prompts, *build)
        warmup = build_prompts(builder, args.warmup, *build)
        return cls(args, plan, tokenizer, str(path), model, prompts, warmup)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    async def run(self) -> RunOutcome:
        a = self.args
        settings = RunSettings(self.plan["base_url"], a.api_key, a.timeout, a.duration, progress=not a.no_progress)
        options = RequestOptions(self.model, a.endpoint, a.ignore_eos, a.include_usage, a.temperature, a.extra_body)
        return await run(settings, options, self.plan["arrivals"], self.prompts, self.warmup, self.count_tokens)

    def config(self) -> dict[str, Any]:
        a = self.args
        arrivals: Arrivals = self.plan["arrivals"]
        return {
            "base_url": self.plan["base_url"],
            "model": self.model,
            "endpoint": a.endpoint,
            "tokenizer": self.tokenizer_path,
            "num_prompts": a.num_prompts,
            "input_len": self.plan["inputs"].describe(),
            "output_len": self.plan["outputs"].describe(),
            "shared_prefix": a.shared_prefix,
            "num_groups": a.num_groups if a.shared_prefix else None,
            "load": arrivals.describe(),
            "request_rate": None if arrivals.rate == float("inf") else arrivals.rate,
            "arrival": arrivals.process,
            "concurrency": arrivals.concurrency,
            "warmup": a.warmup,
            "duration_s": a.duration,
            "timeout_s": a.timeout,
            "seed": a.seed,
            "ignore_eos": a.ignore_eos,
            "temperature": a.temperature,
            "include_usage": a.include_usage,
            "extra_body": a.extra_body,
            "goodput_ms": self.plan["goodput"] or None,
        }


def resolve_tokenizer_path(given: str | None) -> Path:
    """``--tokenizer``, else the embedded model's folder (fetched on first use)."""
    if given:
        return Path(given).expanduser()
    from engine.model_store import ensure_default_model

    try:
        return ensure_default_model(progress=False)
    except (SplitserveError, OSError) as e:
        raise SessionError(f"no --tokenizer given and the embedded model is unavailable: {e}") from None


def served_model(base_url: str, api_key: str | None, timeout: float) -> str:
    """The first model id of ``GET /v1/models``: what a server serving one model expects."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=min(timeout, 30.0))
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        raise SessionError(f"no --model given and GET {base_url}/v1/models gave none: {e}") from None
