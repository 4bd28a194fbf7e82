"""The kvtransfer bench over the mpi transport: its two sides must be ranks of one MPI job.

`run_pair` starts ``mpiexec -n 2 python -m bench.kvtransfer_mpi ARGS``: rank 1 is the
receiver (decode side), rank 0 runs the same timed loop as the other backends and writes
its result JSON where the parent reads it. The ranks talk through `RankConn`, a
`multiprocessing.Connection` look-alike over ``COMM_WORLD`` (bench-internal: two ranks of
our own job on this machine).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class RankConn:
    """``send``/``recv``/``poll`` to one other rank, like a `multiprocessing` pipe end."""

    def __init__(self, peer: int) -> None:
        from kvtransfer.mpi_link import MPI  # through mpi_link: thread level and finalize policy

        self._comm, self._peer, self._tag = MPI.COMM_WORLD, peer, 77

    def send(self, obj: Any) -> None:
        self._comm.send(obj, dest=self._peer, tag=self._tag)

    def recv(self) -> Any:
        return self._comm.recv(source=self._peer, tag=self._tag)

    def poll(self, timeout: float = 0.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self._comm.iprobe(source=self._peer, tag=self._tag):
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(1e-3, max(timeout, 1e-4)))
        return True


def run_pair(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run the mpi bench as a 2-rank job; returns rank 0's result."""
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if mpiexec is None:
        raise RuntimeError("mpiexec not found (pip install mpich)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [mpiexec, "-n", "2", sys.executable, "-m", "bench.kvtransfer_mpi", str(out), *argv]
        subprocess.run(cmd, cwd=ROOT, check=True, timeout=timeout)
        return json.loads(out.read_text())


def main() -> None:
    from kvtransfer.ucx_env import bind_ucx_to

    bind_ucx_to("127.0.0.1")  # before MPI starts: MPICH runs over UCX
    from bench import kvtransfer as bench

    rank_conn = RankConn(peer=1)
    rank = rank_conn._comm.Get_rank()
    args = bench.parse_args(sys.argv[2:])
    if rank == 1:
        bench.receiver("mpi", bench._device(args.device, args.dst_index), args.blocks + 16, RankConn(peer=0))
        return
    result = bench.run(args, conn=rank_conn)
    Path(sys.argv[1]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
