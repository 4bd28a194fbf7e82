"""`WorkerProcess`: one worker rank as a local child process (`LocalProcessLauncher`, tests, benchmarks).

Start-up is slow (model load) and may fail, so `start` waits for the worker's ready file and,
if the process dies first or takes too long, raises with the tail of its log instead of
hanging. The token travels in the environment, never on the command line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cluster.launcher import WorkerStartError
from protocol.worker_spec import TOKEN_ENV, WorkerSpec

__all__ = ["WorkerProcess", "WorkerStartError"]

_REPO_ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    def __init__(self, spec: WorkerSpec, token: str = "", *, env: dict[str, str] | None = None,
                 log_dir: str | Path | None = None) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix=f"splitserve-{spec.role}-", dir=log_dir))
        self.ready_file = self._dir / "ready.json"
        self.log_path = self._dir / "worker.log"
        self.spec = spec.replace(ready_file=str(self.ready_file))
        self.token = token
        self._env = env
        self._proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, object] = {}

    @property
    def address(self) -> str:
        return str(self.info["address"])

    @property
    def worker_id(self) -> str:
        return str(self.info["worker_id"])

    @property
    def agent_name(self) -> str:
        return str(self.info["agent_name"])

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self, timeout: float = 300.0) -> WorkerProcess:
        return self.spawn().wait_ready(timeout)

    def spawn(self) -> WorkerProcess:
        """Start the process without waiting (spawn several, then `wait_ready` each: they load
        their models in parallel)."""
        env = dict(os.environ if self._env is None else self._env)
        env[TOKEN_ENV] = self.token
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        cmd = self.command()
        with open(self.log_path, "wb") as log:
            # own session: a terminal's Ctrl-C goes to the launcher, which stops workers in order
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=_REPO_ROOT,
                                          start_new_session=True)
        return self

    def command(self) -> list[str]:
        """The process's command line; each worker package has a __main__ (python -m decode_worker)."""
        return [sys.executable, "-m", f"{self.spec.role}_worker", "--spec", self.spec.to_json()]

    def wait_ready(self, timeout: float = 300.0) -> WorkerProcess:
        assert self._proc is not None, "spawn() first"
        role = self.spec.role
        deadline = time.monotonic() + timeout
        while not self.poll_ready():
            if self._proc.poll() is not None:
                code = self._proc.returncode
                raise WorkerStartError(f"{role} worker exited with {code}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise WorkerStartError(f"{role} worker not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)
        return self

    def poll_ready(self) -> bool:
        """True once the worker wrote its ready file (then `info` holds it); never blocks."""
        if not self.info and self.ready_file.exists():  # written atomically by worker_runtime.main
            self.info = json.loads(self.ready_file.read_text())
        return bool(self.info)

    @property
    def returncode(self) -> int | None:
        """None while running (or not spawned yet), else the exit code (-N: killed by signal N)."""
        return None if self._proc is None else self._proc.poll()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (clean shutdown), then SIGKILL after ``timeout``; returns the exit code."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self._proc.returncode

    def kill(self) -> None:
        """Abrupt death (what peer-death handling must survive)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "<no log>"

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
