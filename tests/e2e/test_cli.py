"""`splitserve serve` as a user runs it: a subprocess that prints where it listens, then ``ready``,
serves, and on SIGTERM exits 0 leaving no worker, no redis-server and no log folder behind. A
start-up that fails midway (workers up, then one fails) cleans up the same way but keeps the
worker logs and prints where they are; a transport that does not exist is refused before anything
starts."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import psutil
import pytest

from cluster.redis_server import free_port
from tests.e2e.harness import MODEL

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LISTENING = re.compile(
    r"^splitserve: router listening on http://127\.0\.0\.1:(\d+) \(1 prefill, 1 decode workers\)$"
)


class Serve:
    """``python -m splitserve.cli serve --config FILE`` in its own session (so a failing test can
    still kill everything), with stdout read line by line and stderr in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        self.marker = uuid.uuid4().hex  # inherited by every descendant, found even once orphaned
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITSERVE_")}
        with log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "splitserve.cli", "serve", "--config", str(config)],
                cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
                env={**env, "SPLITSERVE_TEST_MARKER": self.marker},
            )
        self.lines: list[str] = []

    def wait_line(self, pattern: str, timeout: float = 240.0) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"serve exited with {self.proc.wait()}:\n{self.stderr()}")
            self.lines.append(line.rstrip("\n"))
            if re.search(pattern, line):
                return line.rstrip("\n")
        raise AssertionError(f"no {pattern!r} line within {timeout}s:\n{self.stderr()}")

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def marked(self) -> list[psutil.Process]:
        """Every live process of this run, wherever it was reparented."""
        found = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("SPLITSERVE_TEST_MARKER") == self.marker:
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def log_folder(self) -> Path:
        """The worker log folder that serve announced when it started the workers."""
        found = re.search(r"; logs in (\S+)$", self.log.read_text(errors="replace"), re.M)
        assert found, self.stderr()
        return Path(found.group(1))

    def kill_all(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


MakeServe = Callable[[str], Serve]


@pytest.fixture
def make_serve(tmp_path: Path) -> Iterator[MakeServe]:
    started: list[Serve] = []

    def make(yaml_text: str) -> Serve:
        config = tmp_path / f"cluster{len(started)}.yaml"
        config.write_text(yaml_text)
        s = Serve(config, tmp_path / f"serve{len(started)}.log")
        started.append(s)
        return s

    yield make
    for s in started:
        s.kill_all()


def _gone(procs: list[psutil.Process], timeout: float = 10.0) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_serve_prints_ready_serves_and_stops_leaving_nothing(make_serve: MakeServe, how: str) -> None:
    """SIGTERM to the launcher, or Ctrl-C as a terminal sends it: SIGINT to the whole group."""
    port = free_port()
    serve = make_serve(f"router:\n  host: 127.0.0.1\n  port: {port}\n")
    listening = serve.wait_line(r"router listening on")
    assert (m := LISTENING.match(listening)) and int(m.group(1)) == port, listening
    assert serve.wait_line(r"^ready$", timeout=30) == "ready"
    children = serve.descendants()
    names = sorted(p.name() for p in children)
    assert any("redis-server" in n for n in names), names
    assert len([p for p in children if "_worker --spec" in " ".join(p.cmdline())]) == 2

    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    r = api.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0,
    )
    assert "Paris" in r.choices[0].message.content

    if how == "sigterm":
        serve.proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(serve.proc.pid, signal.SIGINT)
    assert serve.proc.wait(timeout=60) == 0, serve.stderr()
    assert not _gone(children), f"left running: {children}\n{serve.stderr()}"
    assert not serve.marked()
    assert "exited with" not in serve.stderr()  # every worker stopped cleanly (exit code 0)
    assert not serve.log_folder().exists()  # ... so their logs were not worth keeping


def test_failed_startup_leaves_nothing_but_its_logs(make_serve: MakeServe) -> None:
    """Workers load the model, then cannot fit one KV block in their budget: exit 1, nothing
    left running, the worker logs kept and their folder printed."""
    serve = make_serve(f"router:\n  port: {free_port()}\nkv_cache_memory: 1KiB\n")
    code = serve.proc.wait(timeout=240)
    assert code == 1, serve.stderr()
    assert "error:" in serve.stderr() and "below one block" in serve.stderr()
    assert not serve.marked()
    kept = serve.log_folder()
    try:
        assert f"worker logs kept in {kept}" in serve.stderr()
        assert any("below one block" in p.read_text() for p in kept.glob("*/worker.log"))
    finally:
        shutil.rmtree(kept, ignore_errors=True)


def test_unavailable_transport_is_refused_before_anything_starts(make_serve: MakeServe) -> None:
    serve = make_serve("kvtransfer:\n  backend: infiniband\n")
    assert serve.proc.wait(timeout=120) == 2, serve.stderr()
    available = "available: mpi, nccl, nixl, tcp, ucxx"
    assert f"kvtransfer.backend: 'infiniband' is not an available transport; {available}" in serve.stderr()
    assert "starting" not in serve.stderr() and not serve.marked()


def test_mpi_transport_without_the_mpi_launcher_is_refused(make_serve: MakeServe) -> None:
    serve = make_serve("kvtransfer:\n  backend: mpi\n")
    assert serve.proc.wait(timeout=120) == 2, serve.stderr()
    assert "kvtransfer.backend: mpi connects ranks of one MPI job; start with --launcher mpi" in serve.stderr()
    assert "starting" not in serve.stderr() and not serve.marked()


def test_sigkill_of_the_launcher_leaves_nothing(make_serve: MakeServe) -> None:
    """No clean stop at all: workers watch their parent, redis-server has a parent-death signal."""
    serve = make_serve(f"router:\n  port: {free_port()}\n")
    serve.wait_line(r"^ready$")
    children = serve.descendants()
    assert len(children) >= 3
    serve.proc.kill()
    serve.proc.wait()
    assert not _gone(children, timeout=30), f"left running: {[p.cmdline() for p in children if p.is_running()]}"
    assert not serve.marked()
