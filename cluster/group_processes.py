"""The processes of a sharded worker group (tp x pp > 1) on this machine.

Rank 0 is an ordinary worker process (`WorkerProcess`); the other ranks are followers
(``python -m worker_runtime.group``). All ranks get the group's rendezvous address; on GPU each
rank gets a GPU of its own through ``CUDA_VISIBLE_DEVICES`` (ranks of a group never share one).
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from cluster.launcher import LauncherError, WorkerGroupSpec
from cluster.local_workers import WorkerProcess
from protocol.worker_spec import WorkerSpec


class FollowerProcess(WorkerProcess):
    """A follower rank: loads its shard, writes its ready file, runs rank 0's plans."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "worker_runtime.group", "--spec", self.spec.to_json()]


def free_group_address(host: str = "127.0.0.1") -> str:
    with socket.socket() as s:
        s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"


def group_rank_specs(spec: WorkerSpec, tp: int, pp: int, ep: int = 1) -> tuple[WorkerSpec, ...]:
    """The ``tp x pp`` rank specs of a group whose rank 0 is ``spec`` (pp-major, then tp)."""
    ranks = []
    for r in range(tp * pp):
        name = spec.worker_id if r == 0 or not spec.worker_id else f"{spec.worker_id}-rank{r}"
        ranks.append(spec.replace(
            tp_size=tp, pp_size=pp, ep_size=ep, tp_rank=r % tp, pp_rank=r // tp, worker_id=name,
        ))
    return tuple(ranks)


def check_group_ranks(group: WorkerGroupSpec) -> None:
    """`LauncherError` unless rank r's spec says it is rank r of this tp x pp group."""
    for r, spec in enumerate(group.ranks):
        p = spec.parallel_config()
        if (p.tp_size, p.pp_size, p.rank) != (group.tp, group.pp, r):
            raise LauncherError(
                f"{group.name or group.role}: rank {r} spec says tp_size={p.tp_size} pp_size={p.pp_size} "
                f"rank={p.rank}, the group is tp={group.tp} x pp={group.pp} (see group_rank_specs)"
            )


def spawn_group(
    group: WorkerGroupSpec, token: str, env: dict[str, str], log_dir: Path, gpus: list[int] | None
) -> list[WorkerProcess]:
    """Start every rank of ``group`` (rank 0 first) on a fresh rendezvous address; ``gpus``: one per rank."""
    address = free_group_address()
    if gpus is not None and len(gpus) < group.world_size:
        raise LauncherError(f"{group.name or group.role}: {group.world_size} ranks need as many GPUs, got {gpus}")
    procs: list[WorkerProcess] = []
    try:
        for r, spec in enumerate(group.ranks):
            rank_env = env if gpus is None else {**env, "CUDA_VISIBLE_DEVICES": str(gpus[r])}
            cls = WorkerProcess if r == 0 else FollowerProcess
            procs.append(cls(spec.replace(group_address=address), token, env=rank_env, log_dir=log_dir).spawn())
    except BaseException:
        for p in procs:
            p.kill()
        raise
    return procs
