"""Transport-test peers as ranks of one MPI job (the mpi backend connects ranks of one job).

``start_mpi_ranks`` runs ``mpiexec -n N python -m tests.kvtransfer.mpi_peers ...``; rank ``r``
dials the test's listener and serves `peer_process.run` with ``specs[r]``, so the test drives
each rank exactly like a `multiprocessing` peer. ``-disable-auto-cleanup`` keeps the other
ranks alive when one is killed (the dead-peer test kills one on purpose).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

from tests.kvtransfer.peer_process import PeerSpec, run

ROOT = Path(__file__).resolve().parents[2]


def mpiexec() -> str:
    found = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if found is None:
        raise RuntimeError("mpiexec not found: pip install mpich (the MPI of the mpi transport)")
    return found


class RankProcess:
    """The subset of `multiprocessing.Process` the transport tests use, for one MPI rank."""

    def __init__(self, job: subprocess.Popen[bytes]) -> None:
        self.job, self.pid = job, 0

    def is_alive(self) -> bool:
        if not self.pid:
            return self.job.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{self.pid}/stat") as f:  # a zombie awaiting mpiexec's wait is gone too
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"

    def kill(self) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)

    def join(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or 60.0)
        while self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)

    @property
    def exitcode(self) -> int | None:
        if self.is_alive():
            return None
        code = self.job.poll()
        return 0 if code is None else code  # the job reports a failed rank once all are gone


def start_mpi_ranks(specs: list[PeerSpec]) -> tuple[list[Connection], list[RankProcess]]:
    # the process authkey: torch shares snapshot tensors through multiprocessing's resource
    # sharer, which authenticates with it (spawned children inherit it, our ranks get it here)
    authkey = bytes(multiprocessing.current_process().authkey)
    listener = Listener(("127.0.0.1", 0), authkey=authkey)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPI_PEER_AUTHKEY": authkey.hex()}
    cmd = [mpiexec(), "-disable-auto-cleanup", "-n", str(len(specs)),
           sys.executable, "-m", "tests.kvtransfer.mpi_peers",
           f"{listener.address[0]}:{listener.address[1]}", json.dumps([asdict(s) for s in specs])]
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    conns: dict[int, Connection] = {}
    with listener:
        while len(conns) < len(specs):
            conn = listener.accept()
            conns[conn.recv()] = conn
    procs = [RankProcess(job) for _ in specs]
    return [conns[r] for r in range(len(specs))], procs


def main() -> None:
    from kvtransfer.ucx_env import bind_ucx_to

    bind_ucx_to("127.0.0.1")  # before MPI starts (MPICH runs over UCX), as MpiTransport does
    from kvtransfer.mpi_link import MPI  # through mpi_link: it sets mpi4py's thread level and finalize policy

    host, port = sys.argv[1].rsplit(":", 1)
    specs = [PeerSpec(**s) for s in json.loads(sys.argv[2])]
    rank = MPI.COMM_WORLD.Get_rank()
    authkey = bytes.fromhex(os.environ["MPI_PEER_AUTHKEY"])
    multiprocessing.current_process().authkey = authkey
    conn = Client((host, int(port)), authkey=authkey)
    conn.send(rank)
    run(specs[rank], conn)


if __name__ == "__main__":
    main()
