"""The follower ranks of a replica's worker group (tp x pp > 1), each in its own bundle.

A replica of a sharded pool holds one placement group with a bundle per rank (`cluster.placement`).
The replica actor sits in bundle 0 and runs rank 0; rank ``i`` runs in bundle ``i`` as a small actor
(`FollowerRank`) whose only job is to own the follower process, the very ``python -m
worker_runtime.group`` process the local launcher starts (`cluster.group_processes.FollowerProcess`).
Going through an actor, not a child of the replica, is what puts the rank on its bundle's resources:
Ray sets the actor's ``CUDA_VISIBLE_DEVICES`` to the bundle's GPU, and the process inherits it.

The actors are owned by the replica actor, so Ray removes them when the replica dies; their
processes do not need the actor to leave: a follower exits when rank 0 releases it or is gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.group_processes import FollowerProcess
from cluster.launcher import WorkerStartError
from protocol.worker_spec import WorkerSpec

STOP_TIMEOUT_S = 15.0


class FollowerRank:
    """One follower rank: spawns its process at construction; ``env``: the launcher's environment
    for the group's ranks, laid over this actor's own (which carries the bundle's GPU)."""

    def __init__(self, spec_json: str, token: str, env: dict[str, str]) -> None:
        self._log_dir = tempfile.mkdtemp(prefix="splitserve-ray-follower-")
        spec = WorkerSpec.from_json(spec_json)
        self.proc = FollowerProcess(spec, token, env={**os.environ, **env}, log_dir=self._log_dir).spawn()

    def pid(self) -> int:
        return self.proc.pid

    def poll_ready(self) -> bool:
        """True once the rank has loaded its shard and joined the group; never blocks."""
        return self.proc.poll_ready()

    def returncode(self) -> int | None:
        return self.proc.returncode

    def log_tail(self, n: int = 4000) -> str:
        return self.proc.log_tail(n)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Wait for the process to leave (rank 0 releases it when it stops), killing it after
        ``timeout``: a follower ignores SIGTERM by design (`worker_runtime.group`)."""
        code = self.proc.stop(timeout)
        if code == 0:
            shutil.rmtree(self._log_dir, ignore_errors=True)
        return code

    def __del__(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None:
            proc.kill()


def _actor_options(bundle: dict[str, float], pg: Any, index: int) -> dict[str, Any]:
    return {
        "num_cpus": bundle.get("CPU", 0.0), "num_gpus": bundle.get("GPU", 0.0),
        "resources": {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
        "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index),
        "max_restarts": 0, "max_concurrency": 4,  # health checks while a stop waits
    }


def start_followers(ranks: list[WorkerSpec], token: str, env: dict[str, str]) -> list[Any]:
    """A `FollowerRank` actor per spec (``ranks[i]`` is rank ``i + 1``) in bundle ``i + 1`` of the
    current placement group; raises `WorkerStartError` outside one or with too few bundles."""
    pg = ray.util.get_current_placement_group()
    if pg is None or len(pg.bundle_specs) < len(ranks) + 1:
        have = 0 if pg is None else len(pg.bundle_specs)
        raise WorkerStartError(f"a group of {len(ranks) + 1} ranks needs as many bundles in the replica's "
                               f"placement group, it has {have}")
    cls = ray.remote(FollowerRank)
    return [cls.options(**_actor_options(dict(pg.bundle_specs[i + 1]), pg, i + 1)).remote(s.to_json(), token, env)
            for i, s in enumerate(ranks)]


def dead_follower(followers: list[Any], timeout: float = 5.0) -> str | None:
    """A description of the first follower whose process exited (or whose actor is gone), else None."""
    codes = ray.get([f.returncode.remote() for f in followers], timeout=timeout)
    for i, code in enumerate(codes):
        if code is not None:
            return f"rank {i + 1} exited with {code}:\n{ray.get(followers[i].log_tail.remote(2000), timeout=timeout)}"
    return None


def wait_followers_ready(followers: list[Any], deadline: float) -> bool:
    """True once every follower is ready; raises `WorkerStartError` when one dies first."""
    if all(ray.get([f.poll_ready.remote() for f in followers], timeout=30.0)):
        return True
    if (dead := dead_follower(followers)) is not None:
        raise WorkerStartError(dead)
    if time.monotonic() > deadline:
        raise WorkerStartError("follower ranks not ready in time")
    return False


def stop_followers(followers: list[Any], timeout: float = STOP_TIMEOUT_S) -> None:
    """Stop every follower process (after rank 0 stopped), then remove the actors; never raises."""
    # an actor already gone (its process leaves once rank 0 is gone: see the module docstring)
    with contextlib.suppress(Exception):
        ray.get([f.stop.remote(timeout) for f in followers], timeout=timeout + 10.0)
    for f in followers:
        with contextlib.suppress(Exception):
            ray.kill(f)
