"""Joining (or, for ``up`` alone, starting) the Ray cluster that the commands act on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from splitserve.errors import ClusterStartError
from splitserve.ray_deploy import NAMESPACE


def _ray_cli() -> str:
    beside = Path(sys.executable).parent / "ray"  # the venv's own ray, matching the imported one
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def start_local_head(num_cpus: int) -> None:
    """``ray start --head`` on this machine: it outlives ``splitserve up`` so that ``status``,
    ``scale`` and ``down`` find it; ``ray stop`` (or ``splitserve down --stop-ray``) ends it."""
    cmd = [_ray_cli(), "start", "--head", f"--num-cpus={num_cpus}", "--disable-usage-stats"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise ClusterStartError(f"could not start a local Ray head ({' '.join(cmd)}):\n{done.stderr[-2000:]}")


def connect(address: str | None, *, start_if_missing: bool = False, num_cpus: int | None = None) -> bool:
    """Connect this process to Ray; returns True when it started a local head for it.

    ``address`` None means the cluster this machine belongs to (``auto``); with
    ``start_if_missing`` and none running, a local head is started first."""
    import ray

    if ray.is_initialized():
        return False
    kw = {"namespace": NAMESPACE, "log_to_driver": False, "logging_level": "WARNING"}
    try:
        ray.init(address=address or "auto", **kw)
        return False
    except ConnectionError:
        if address not in (None, "auto") or not start_if_missing:
            where = address or "auto"
            raise ClusterStartError(f"no Ray cluster at {where} (start one, or run `splitserve up`)") from None
    start_local_head(num_cpus or max(8, os.cpu_count() or 1))
    ray.init(address="auto", **kw)
    return True


def stop_local_ray() -> None:
    """``ray stop`` for the head that ``up`` started on this machine."""
    import ray

    ray.shutdown()
    subprocess.run([_ray_cli(), "stop"], capture_output=True, timeout=120)
