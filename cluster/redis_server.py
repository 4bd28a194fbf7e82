"""A private `redis-server` for ``redis: embedded`` deployments and for tests.

The control plane holds only soft state (heartbeats, loads, KV events that workers republish),
so the embedded server runs with persistence off: a restart is an empty store, never a stale
one. It binds to localhost on a free port so several clusters (or test runs) coexist.

Localhost is not private on a shared machine, so the server requires a password generated
per start. It goes to redis-server in a config file only its owner can read (never on the
command line, which every local user can see) and to clients inside `url`, which the
launcher hands to workers through their environment and never prints (`redact_url`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit

import redis

from engine.errors import SplitserveError
from protocol.control_plane import ControlPlane

if TYPE_CHECKING:
    from cluster.config import RedisConfig


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the launcher dies, even by SIGKILL (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class RedisServerError(SplitserveError):
    """The embedded redis-server could not be started."""


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``: what may be printed or logged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


def with_password(url: str, password: str) -> str:
    """``url`` carrying ``password`` (replacing one it had)."""
    parts = urlsplit(url)
    user = quote(parts.username or "", safe="")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """Start ``redis-server`` on a free localhost port; stop it on `stop()` or context exit.

    ``password``: None generates one per instance; "" runs without (only for tests of that)."""

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        executable: str = "redis-server",
        startup_timeout_s: float = 10.0,
        password: str | None = None,
    ) -> None:
        self.password = secrets.token_urlsafe(32) if password is None else password
        self.host = host
        self.port = port
        self.executable = executable
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RedisServerError("embedded redis is not started")
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (tests kill it)."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedRedis:
        if self.running:
            return self
        exe = shutil.which(self.executable)
        if exe is None:
            raise RedisServerError(
                f"{self.executable!r} not found on PATH; install it (apt-get install redis-server) "
                "or set redis.url to an existing server"
            )
        # a port picked free can be taken before redis binds it; retry a few times
        for _attempt in range(3):
            port = self.port or free_port(self.host)
            self._dir = tempfile.TemporaryDirectory(prefix="splitserve-redis-")
            args = [exe, self._write_conf(Path(self._dir.name), port)]
            log = Path(self._dir.name) / "redis.log"
            with log.open("wb") as out:
                self._proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                              preexec_fn=_die_with_parent)
            if self._wait_ready(port):
                self.port = port
                Path(args[1]).unlink()  # read at start-up only: no password left on disk after a crash
                return self
            tail = log.read_text(errors="replace")[-2000:]
            self.stop()
            if "Address already in use" not in tail or self.port is not None:
                raise RedisServerError(f"redis-server did not start on port {port}:\n{tail}")
        raise RedisServerError("redis-server could not find a free port")

    def _write_conf(self, folder: Path, port: int) -> str:
        lines = [
            f"port {port}", f"bind {self.host}", 'save ""', "appendonly no", f"dir {folder}",
            "protected-mode yes", "loglevel warning",
        ]  # fmt: skip
        if self.password:
            lines.append(f"requirepass {self.password}")
        conf = folder / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # readable by us alone
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        return str(conf)

    def _wait_ready(self, port: int) -> bool:
        client = redis.Redis(host=self.host, port=port, socket_connect_timeout=0.2, password=self.password or None)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while time.monotonic() < deadline:
                if self._proc is None or self._proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.exceptions.RedisError:
                    time.sleep(0.02)
            return False
        finally:
            client.close()

    def restart(self) -> EmbeddedRedis:
        """Start again after a crash, on the same port with the same password, so every client
        reconnects by itself (the store starts empty: workers re-register and republish)."""
        if self.port is None:
            raise RedisServerError("embedded redis was never started")
        self.stop()
        return self.start()

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        # a forgotten server must not outlive the process that started it
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()


@contextmanager
def open_control_plane(config: RedisConfig, *, ttl_s: float = 10.0, token: str = "") -> Iterator[ControlPlane]:
    """The configured control plane; ``embedded`` starts a private redis-server for its lifetime."""
    server = EmbeddedRedis().start() if config.embedded else None
    cp = ControlPlane.from_url(server.url if server else config.connect_url(), ttl_s=ttl_s, token=token)
    try:
        yield cp
    finally:
        cp.close()
        if server is not None:
            server.stop()
