"""The printed table, the results JSON, and ``--compare`` of two results side by side.

A result file is self-describing so a number can be traced months later: the command's settings,
where and when it ran (host, accelerators, UTC date, the splitserve commit when in a checkout),
the summary, and every request's record (``RESULT_VERSION`` bumps if that layout changes).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.serving.record import RequestRecord

RESULT_VERSION = 1
_LATENCIES = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))
_STATS = ("mean", "p50", "p90", "p99")
# (label, path into the summary, True when higher is better)
_THROUGHPUTS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("completed requests", ("completed",), True),
    ("failed requests", ("failed",), False),
    ("duration (s)", ("duration_s",), False),
    ("requests/s", ("request_throughput",), True),
    ("output tok/s", ("output_throughput",), True),
    ("input tok/s", ("input_throughput",), True),
    ("goodput (req/s)", ("goodput", "request_throughput"), True),
    ("goodput fraction", ("goodput", "fraction"), True),
)


class ResultFileError(ValueError):
    """A ``--compare`` argument that is not a results file of this tool."""


def git_commit() -> str | None:
    """The splitserve checkout's HEAD, or ``SPLITSERVE_COMMIT`` where the tree was copied without
    its .git (as `bench.common` does); None otherwise."""
    if os.environ.get("SPLITSERVE_COMMIT"):
        return os.environ["SPLITSERVE_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def host_info() -> dict[str, Any]:
    """Where the client ran; the accelerators are listed when ``nvidia-smi`` is there (a local server)."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "gpus": [],
    }
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            info["gpus"] = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def build_result(config: dict[str, Any], summary: dict[str, Any], records: Sequence[RequestRecord]) -> dict[str, Any]:
    return {
        "benchmark": "serving",
        "version": RESULT_VERSION,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "host": host_info(),
        "config": config,
        "summary": summary,
        "requests": [r.to_json() for r in records],
    }


def save_result(result: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return p


def load_result(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ResultFileError(f"{path}: cannot read a results file ({e})") from None
    if not isinstance(data, dict) or data.get("benchmark") != "serving" or "summary" not in data:
        raise ResultFileError(f"{path}: not a `splitserve bench` results file")
    return data


def _get(summary: dict[str, Any], path: Sequence[str]) -> Any:
    value: Any = summary
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _rows(summary: dict[str, Any]) -> list[tuple[str, Any, bool]]:
    rows = [(label, _get(summary, path), higher) for label, path, higher in _THROUGHPUTS]
    for key, name in _LATENCIES:
        rows += [(f"{name} {stat} (ms)", _get(summary, (key, stat)), False) for stat in _STATS]
    return [r for r in rows if r[1] is not None]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def format_summary(result: dict[str, Any]) -> str:
    """The summary as a two-column table, headed by what was run."""
    cfg = result.get("config", {})
    head = [f"splitserve bench: {cfg.get('base_url', '?')} model={cfg.get('model', '?')} "
            f"endpoint={cfg.get('endpoint', '?')} load={cfg.get('load', '?')}"]
    rows = _rows(result["summary"])
    width = max(len(label) for label, _, _ in rows)
    lines = head + [f"  {label.ljust(width)}  {_fmt(v):>12}" for label, v, _ in rows]
    for err, n in result["summary"].get("errors", {}).items():
        lines.append(f"  error x{n}: {err}")
    return "\n".join(lines)


def format_compare(a: dict[str, Any], b: dict[str, Any], names: Sequence[str] = ("a", "b")) -> str:
    """Two results side by side with b/a ratios; a ``*`` marks the ratios where b is better."""
    ra, rb = dict((x[0], x[1]) for x in _rows(a["summary"])), _rows(b["summary"])
    labels = [label for label, _, _ in rb if label in ra]
    width = max([len("metric"), *map(len, labels)])
    cols = [n[-28:] for n in names]
    lines = [f"{'metric'.ljust(width)}  {cols[0]:>14}  {cols[1]:>14}  {'b/a':>8}"]
    for label, vb, higher in rb:
        if label not in ra:
            continue
        va = ra[label]
        ratio = vb / va if isinstance(va, int | float) and isinstance(vb, int | float) and va else None
        better = ratio is not None and ratio != 1 and (ratio > 1) == higher
        shown = "" if ratio is None else f"{ratio:.3f}" + ("*" if better else " ")
        lines.append(f"{label.ljust(width)}  {_fmt(va):>14}  {_fmt(vb):>14}  {shown:>8}")
    for key in ("commit", "date"):
        lines.append(f"{key.ljust(width)}  {a.get(key)!s:>14}  {b.get(key)!s:>14}")
    return "\n".join(lines)
