"""`LocalProcessLauncher`: worker groups as child processes of this one (serve, tests, benchmarks).

Each rank is a `WorkerProcess` in a session of its own (a terminal's Ctrl-C reaches only the
launcher, which stops workers in order). The caller's ``env`` carries what the workers need from
the composition layer: the control-plane URL and the launcher's pid for the workers' parent-death
watch. Logs go to one folder per launcher; a folder the launcher created itself is removed on
`close` when every worker ended cleanly, and kept (its path returned) when one did not.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cluster.group_processes import check_group_ranks, spawn_group
from cluster.launcher import GroupStatus, Launcher, LauncherError, ReadyInfo, WorkerGroupHandle, WorkerGroupSpec
from cluster.local_workers import WorkerProcess


class LocalWorkerGroup(WorkerGroupHandle):
    """A group of local worker processes; ``processes`` is in rank order."""

    def __init__(self, spec: WorkerGroupSpec, processes: list[WorkerProcess]) -> None:
        super().__init__(spec)
        self.processes = processes

    @property
    def pid(self) -> int:
        """Rank 0's process id (local only: tests kill or inspect it)."""
        return self.processes[0].pid

    @property
    def log_path(self) -> Path:
        return self.processes[0].log_path

    def poll_ready(self) -> ReadyInfo | None:
        if not all(p.poll_ready() for p in self.processes):
            return None
        info = self.processes[0].info
        return ReadyInfo(str(info["worker_id"]), str(info["address"]), str(info["agent_name"]))

    def status(self) -> GroupStatus:
        codes = [p.returncode for p in self.processes]
        ended = [c for c in codes if c is not None]
        exit_code = next((c for c in ended if c != 0), 0) if ended else None
        log = str(self.log_path if len(self.processes) == 1 else self.log_path.parent)
        return GroupStatus(alive=not ended, exit_code=exit_code, log=log)

    def log_tail(self, n: int = 4000) -> str:
        return "\n".join(p.log_tail(n) for p in self.processes)


class LocalProcessLauncher(Launcher):
    """Worker groups as local processes, one per rank. ``token`` is the cluster token (environment, never
    argv); ``log_dir`` None means a fresh folder under the system temp dir, owned by the launcher."""

    def __init__(self, token: str, *, env: Mapping[str, str] | None = None, log_dir: str | Path | None = None) -> None:
        self.token = token
        self.env = dict(os.environ if env is None else env)
        self._owns_log_dir = log_dir is None
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="splitserve-logs-"))
        self.groups: list[LocalWorkerGroup] = []
        self._next_gpu = 0  # sharded groups take consecutive GPUs

    @property
    def log_location(self) -> str:
        return str(self.log_dir)

    def start(self, groups: Sequence[WorkerGroupSpec]) -> list[WorkerGroupHandle]:
        for g in groups:  # every group checked before any process starts
            check_group_ranks(g)
        started: list[WorkerGroupHandle] = []
        for g in groups:
            if g.world_size > 1:  # a sharded group: one process per rank (cluster.group_processes)
                procs = spawn_group(g, self.token, self.env, self.log_dir, self._group_gpus(g))
            else:
                env = _device_env(self.env, g.ranks[0].device, len(self.groups))
                procs = [WorkerProcess(g.ranks[0], self.token, env=env, log_dir=self.log_dir).spawn()]
            handle = LocalWorkerGroup(g, procs)
            self.groups.append(handle)
            started.append(handle)
        return started

    def _group_gpus(self, g: WorkerGroupSpec) -> list[int] | None:
        """Distinct GPUs for the ranks of ``g`` (None on CPU or when the user pinned devices)."""
        if g.ranks[0].device != "cuda" or "CUDA_VISIBLE_DEVICES" in self.env:
            return None
        import torch

        count = torch.cuda.device_count()
        if g.world_size > count:
            raise LauncherError(f"{g.name or g.role}: {g.world_size} ranks need {g.world_size} GPUs, {count} here")
        first = self._next_gpu
        self._next_gpu += g.world_size
        return [(first + r) % count for r in range(g.world_size)]

    def stop(self, handles: Sequence[WorkerGroupHandle] | None = None, grace_s: float = 15.0) -> list[GroupStatus]:
        chosen = [self._own(h) for h in handles] if handles is not None else list(self.groups)
        procs = [p for g in chosen for p in g.processes]
        if procs:  # in parallel: each may take its whole grace period
            with ThreadPoolExecutor(len(procs)) as pool:
                list(pool.map(lambda p: p.stop(grace_s), procs))
        return [g.status() for g in chosen]

    def restart(self, handle: WorkerGroupHandle) -> None:
        group = self._own(handle)
        if group.status().alive:
            raise LauncherError(f"{handle.worker_id}: still running; stop it before a restart")
        env = _device_env(self.env, group.spec.ranks[0].device, self.groups.index(group))
        group.processes = [WorkerProcess(group.spec.ranks[0], self.token, env=env, log_dir=self.log_dir).spawn()]
        group.info = None

    def kill(self, handle: WorkerGroupHandle) -> None:
        for p in self._own(handle).processes:
            p.kill()

    def close(self) -> str | None:
        statuses = self.stop()
        if all(s.clean_exit for s in statuses):
            if self._owns_log_dir:
                shutil.rmtree(self.log_dir, ignore_errors=True)
            return None
        return str(self.log_dir)

    def _own(self, handle: WorkerGroupHandle) -> LocalWorkerGroup:
        if not isinstance(handle, LocalWorkerGroup) or handle not in self.groups:
            raise LauncherError(f"{handle.worker_id}: not started by this launcher")
        return handle


def _device_env(env: dict[str, str], device: str, index: int) -> dict[str, str]:
    """GPU workers take one device each, round-robin, unless the user pinned devices already."""
    if device != "cuda" or "CUDA_VISIBLE_DEVICES" in env:
        return env
    import torch

    count = torch.cuda.device_count()
    return {**env, "CUDA_VISIBLE_DEVICES": str(index % count)} if count else env
