"""Entry of one worker rank inside an MPI job (`cluster.mpi_launcher`).

``python -m cluster.mpi_rank FOLDER MODULE ARGS...`` sends this rank's output to
``FOLDER/worker.log`` (mpiexec would interleave every rank's), records its pid (the launcher
signals ranks directly: hydra's proxies are not our children) and, at the end, its exit code,
then runs ``python -m MODULE ARGS...`` in this process.

The worker's own parent-death watch compares its parent pid with the launcher's; under MPI
the parent is hydra's proxy, so that watch is handed to a thread here that polls the
launcher's pid and SIGTERMs this rank (a graceful stop) once the launcher is gone.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

PARENT_PID_ENV = "SPLITSERVE_PARENT_PID"  # worker_runtime.agent's name (cluster must not import it)


def watch_launcher(pid: int, interval_s: float = 1.0) -> None:
    def watch() -> None:
        while True:
            time.sleep(interval_s)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def main() -> None:
    folder, module = Path(sys.argv[1]), sys.argv[2]
    with open(folder / "worker.log", "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    (folder / "pid").write_text(str(os.getpid()))
    if parent := os.environ.pop(PARENT_PID_ENV, ""):
        watch_launcher(int(parent))
    code = 0
    try:
        sys.argv = [module, *sys.argv[3:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        (folder / "exit").write_text(str(code))
    raise SystemExit(code)


if __name__ == "__main__":
    main()
