"""The data-plane pair as ranks of one MPI job (the mpi transport connects ranks of one job):
`MpiLauncher` starts both, `MpiWorker` gives each the `WorkerProcess` surface the tests use."""

from __future__ import annotations

from pathlib import Path

from cluster.launcher import WorkerGroupSpec
from cluster.mpi_launcher import MpiLauncher, MpiRankGroup
from tests.dataplane.harness import TOKEN, worker_spec


class MpiWorker:
    def __init__(self, launcher: MpiLauncher, group: MpiRankGroup) -> None:
        self.launcher, self.group = launcher, group

    @property
    def address(self) -> str:
        return self.group.address

    @property
    def worker_id(self) -> str:
        return self.group.worker_id

    @property
    def pid(self) -> int:
        pid = self.group.pid
        assert pid is not None, "rank has not started"
        return pid

    def stop(self) -> int | None:
        return self.launcher.stop([self.group])[0].exit_code

    def log_tail(self) -> str:
        return self.group.log_tail()


def start_mpi_pair(model: Path, timeout: float = 300.0) -> tuple[MpiLauncher, MpiWorker, MpiWorker]:
    launcher = MpiLauncher(TOKEN)
    groups = [WorkerGroupSpec.single(worker_spec(role, model, "mpi")) for role in ("prefill", "decode")]
    handles = launcher.start(groups)
    try:
        launcher.wait_ready(handles, timeout)
    except BaseException:
        launcher.close()
        raise
    prefill, decode = (MpiWorker(launcher, h) for h in handles)  # type: ignore[arg-type]
    return launcher, prefill, decode
