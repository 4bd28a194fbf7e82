"""The first hour of a new user, against one real ``splitserve serve`` (the default config).

The README's request examples run as written (only the port differs: the test takes a free
one), each request leaves its log line on the console, and once the cluster is idle its
workers cost (almost) no CPU: with NIXL's progress thread busy-polling each worker used to
burn a whole core while nothing ran.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from cluster.redis_server import free_port
from splitserve.cli import build_parser
from tests.e2e.harness import MODEL

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
FIRST_COMMAND = (
    "bash scripts/bootstrap.sh && .venv/bin/splitserve serve          "
    "# the local cluster: embedded SmolLM2, router on :8000"
)
REQUEST_LINE = re.compile(
    r"request (?P<id>\S+) status=(?P<status>\d+) route=(?P<route>\w+) prompt_tokens=(?P<prompt>\d+) "
    r"output_tokens=(?P<out>\d+) ttft_ms=(?P<ttft>[\d.]+) total_ms=(?P<total>[\d.]+) finish=(?P<finish>\S+)$"
)
LONG = " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(40))
IDLE_S = 10.0
IDLE_BUDGET = 0.02  # of one core, per worker


@dataclass
class Served:
    proc: subprocess.Popen[str]
    port: int
    stderr_path: Path
    listening: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def workers(self) -> list[psutil.Process]:
        kids = psutil.Process(self.proc.pid).children(recursive=True)
        return [p for p in kids if "_worker --spec" in " ".join(p.cmdline())]

    def request_lines(self) -> list[re.Match[str]]:
        found = [REQUEST_LINE.search(line) for line in self.stderr().splitlines() if " request " in line]
        return [m for m in found if m is not None]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``splitserve serve --port P``: the default config (router on 127.0.0.1) on a free port."""
    port = free_port()
    err = tmp_path_factory.mktemp("serve") / "stderr.log"
    with err.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "splitserve", "serve", "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE,
            stderr=f, text=True, start_new_session=True, env=os.environ.copy(),
        )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().rstrip("\n") for _ in range(2)]  # blocks until the cluster is up
        assert lines[1] == "ready", f"{lines}\n{err.read_text()[-4000:]}"
        yield Served(proc, port, err, lines[0])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _as_served(code: str, served: Served) -> str:
    assert "http://localhost:8000" in code
    return code.replace("http://localhost:8000", served.url)


def test_readme_first_command_is_unchanged() -> None:
    assert _readme_blocks("bash")[0].splitlines()[0] == FIRST_COMMAND


def test_default_bind_is_local_without_a_warning(served: Served) -> None:
    assert served.listening.startswith(f"splitserve: router listening on http://127.0.0.1:{served.port} ")
    assert "warning" not in served.stderr()


def test_readme_examples_run_as_written(served: Served) -> None:
    (curl,) = [b for b in _readme_blocks("bash") if "localhost:8000/v1" in b]
    r = subprocess.run(["bash", "-c", _as_served(curl, served)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Paris" in r.stdout, r
    (client,) = [b for b in _readme_blocks("python") if "localhost:8000/v1" in b]
    r = subprocess.run([sys.executable, "-c", _as_served(client, served)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "Paris" in r.stdout, r
    (bench,) = [b for b in _readme_blocks("bash") if "splitserve bench --base-url" in b]
    run, compare = bench.split("\n.venv/bin/splitserve bench --compare")
    out = Path(tempfile.mkdtemp(prefix="readme-bench-"))
    run = _as_served(run, served).replace("/tmp/bench-a.json", str(out / "a.json"))
    r = subprocess.run(["bash", "-c", run], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r
    summary = json.loads((out / "a.json").read_text())["summary"]
    assert summary["completed"] == 8 and summary["failed"] == 0, summary
    compare = ".venv/bin/splitserve bench --compare" + compare.split("#")[0]  # this run beside itself
    for name in ("/tmp/bench-a.json", "/tmp/bench-b.json"):
        compare = compare.replace(name, str(out / "a.json"))
    r = subprocess.run(["bash", "-c", compare], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0 and "ttft" in r.stdout.lower(), r
    for page in ("/docs", "/metrics", "/health"):
        assert httpx.get(f"{served.url}{page}", timeout=30).status_code == 200, page
    # the serve lines are real flags (running them would start more clusters)
    for block in _readme_blocks("bash"):
        for line in block.splitlines():
            if not line.startswith(".venv/bin/splitserve serve "):
                continue
            words = shlex.split(line, comments=True)
            if len(words) > 2:
                args = build_parser().parse_args(["key" if w.startswith("$") else w for w in words[1:]])
                assert args.command == "serve", line


def test_each_request_logs_one_line_with_its_route(served: Served) -> None:
    api = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=120)
    before = len(served.request_lines())
    short = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    long = api.completions.create(model=MODEL, prompt=LONG, max_tokens=4, temperature=0)
    deadline = time.monotonic() + 10
    while len(served.request_lines()) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    a, b = served.request_lines()[before:]
    assert a["id"] == short.id and a["route"] == "local" and a["status"] == "200"
    assert int(a["prompt"]) == short.usage.prompt_tokens and int(a["out"]) == short.usage.completion_tokens
    assert b["id"] == long.id and b["route"] == "disaggregated" and b["status"] == "200"
    assert float(b["ttft"]) <= float(b["total"])


def test_idle_workers_use_under_2_percent_of_a_core(served: Served) -> None:
    """After a disaggregated request (so the KV transport's peers are connected), nothing runs."""
    api = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=120)
    api.completions.create(model=MODEL, prompt=LONG + " Once more.", max_tokens=2)
    workers = served.workers()
    assert len(workers) == 2
    time.sleep(2.0)  # let the last request's bookkeeping settle
    before = {w.pid: w.cpu_times() for w in workers}
    t0 = time.monotonic()
    time.sleep(IDLE_S)
    wall = time.monotonic() - t0
    used = {w.pid: (w.cpu_times().user + w.cpu_times().system
                    - before[w.pid].user - before[w.pid].system) / wall for w in workers}
    ids = {w.pid: re.search(r'"worker_id": "([^"]+)"', " ".join(w.cmdline())) for w in workers}
    names = {pid: m.group(1) if m else str(pid) for pid, m in ids.items()}
    assert all(u < IDLE_BUDGET for u in used.values()), {names[p]: f"{100 * u:.2f}%" for p, u in used.items()}
