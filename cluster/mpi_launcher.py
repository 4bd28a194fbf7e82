"""`MpiLauncher`: every worker of the cluster as a rank of one MPMD ``mpiexec`` job.

``splitserve serve --launcher mpi`` starts one ``mpiexec -n 1 <prefill worker> : -n 1 <decode
worker> : ...`` job (the MPI library and ``mpiexec`` come from the ``mpich`` wheel), so the
workers share ``COMM_WORLD`` and the ``mpi`` KV transport reaches its peers by rank; any other
transport works too. Each rank runs through `cluster.mpi_rank` (own log file, pid and exit
files in its folder); readiness is the worker's ready file, as with local processes.

An MPI job cannot grow: `start` is called once with every group. ``-disable-auto-cleanup``
keeps the other ranks running when one exits, so stopping or killing one worker does not
take the cluster down (a rank that dies mid-transfer may still hang its MPI peers: MPI is
not fault tolerant). Ranks are signalled by pid: SIGTERM (graceful), SIGKILL after the grace.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from cluster.launcher import GroupStatus, Launcher, LauncherError, ReadyInfo, WorkerGroupHandle, WorkerGroupSpec
from protocol.worker_spec import TOKEN_ENV

WORLD_ENV = "SPLITSERVE_MPI_WORLD"  # read by kvtransfer.mpi_link: one id for the whole job
_REPO_ROOT = Path(__file__).resolve().parent.parent


def find_mpiexec() -> str:
    found = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if found is None:
        raise LauncherError("the mpi launcher needs mpiexec: pip install mpich mpi4py")
    return found


class MpiRankGroup(WorkerGroupHandle):
    """A single-rank group inside the job; its files live in ``folder``."""

    def __init__(self, spec: WorkerGroupSpec, folder: Path, job: subprocess.Popen[bytes]) -> None:
        super().__init__(spec)
        self.folder, self.job = folder, job

    @property
    def pid(self) -> int | None:
        try:
            return int((self.folder / "pid").read_text())
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        pid = self.pid
        if pid is None:
            return self.job.poll() is None and not (self.folder / "exit").exists()
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def poll_ready(self) -> ReadyInfo | None:
        ready = self.folder / "ready.json"
        if not ready.exists():
            return None
        info = json.loads(ready.read_text())
        return ReadyInfo(str(info["worker_id"]), str(info["address"]), str(info["agent_name"]))

    def status(self) -> GroupStatus:
        if self.running():
            return GroupStatus(True, None, str(self.folder / "worker.log"))
        try:
            code = int((self.folder / "exit").read_text())
        except (OSError, ValueError):
            code = -signal.SIGKILL  # gone without recording an exit: killed
        return GroupStatus(False, code, str(self.folder / "worker.log"))

    def log_tail(self, n: int = 4000) -> str:
        try:
            return (self.folder / "worker.log").read_text(errors="replace")[-n:]
        except OSError:
            return "<no log>"

    def signal(self, sig: int) -> None:
        pid = self.pid
        if pid is not None and self.running():
            os.kill(pid, sig)


class MpiLauncher(Launcher):
    """One ``mpiexec`` job for every worker (see the module docstring)."""

    def __init__(self, token: str, *, env: Mapping[str, str] | None = None, log_dir: str | Path | None = None) -> None:
        self.token = token
        self.env = dict(os.environ if env is None else env)
        self._owns_log_dir = log_dir is None
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="splitserve-logs-"))
        self.groups: list[MpiRankGroup] = []
        self.job: subprocess.Popen[bytes] | None = None

    @property
    def log_location(self) -> str:
        return str(self.log_dir)

    def start(self, groups: Sequence[WorkerGroupSpec]) -> list[WorkerGroupHandle]:
        if self.job is not None:
            raise LauncherError("an MPI job cannot grow: the mpi launcher starts every worker at once")
        for g in groups:
            if g.world_size != 1:
                raise LauncherError(f"{g.name or g.role}: the mpi launcher runs single-rank groups")
        cmd, folders = [find_mpiexec(), "-disable-auto-cleanup"], []
        for i, g in enumerate(groups):
            folder = Path(tempfile.mkdtemp(prefix=f"splitserve-{g.role}-", dir=self.log_dir))
            spec = g.ranks[0].replace(ready_file=str(folder / "ready.json"))
            device = ["-env", "CUDA_VISIBLE_DEVICES", str(i % _gpu_count())] if spec.device == "cuda" else []
            if i:
                cmd.append(":")
            cmd += ["-n", "1", *device, sys.executable, "-m", "cluster.mpi_rank", str(folder),
                    f"{spec.role}_worker", "--spec", spec.to_json()]
            folders.append(folder)
        env = {**self.env, TOKEN_ENV: self.token, WORLD_ENV: uuid.uuid4().hex,
               "PYTHONPATH": os.pathsep.join(p for p in (str(_REPO_ROOT), self.env.get("PYTHONPATH", "")) if p)}
        with open(self.log_dir / "mpiexec.log", "wb") as log:
            self.job = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=_REPO_ROOT,
                                        start_new_session=True)
        self.groups = [MpiRankGroup(g, f, self.job) for g, f in zip(groups, folders)]
        return list(self.groups)

    def stop(self, handles: Sequence[WorkerGroupHandle] | None = None, grace_s: float = 15.0) -> list[GroupStatus]:
        chosen = [self._own(h) for h in handles] if handles is not None else list(self.groups)
        for g in chosen:
            g.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while any(g.running() for g in chosen) and time.monotonic() < deadline:
            time.sleep(0.05)
        for g in chosen:
            g.signal(signal.SIGKILL)
        return [g.status() for g in chosen]

    def kill(self, handle: WorkerGroupHandle) -> None:
        self._own(handle).signal(signal.SIGKILL)

    def close(self) -> str | None:
        statuses = self.stop()
        if self.job is not None:
            try:
                self.job.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.job.pid, signal.SIGKILL)
                self.job.wait()
        if all(s.clean_exit for s in statuses):
            if self._owns_log_dir:
                shutil.rmtree(self.log_dir, ignore_errors=True)
            return None
        return str(self.log_dir)

    def _own(self, handle: WorkerGroupHandle) -> MpiRankGroup:
        if not isinstance(handle, MpiRankGroup) or handle not in self.groups:
            raise LauncherError(f"{handle.worker_id}: not started by this launcher")
        return handle


def _gpu_count() -> int:
    import torch

    return max(1, torch.cuda.device_count())
