"""The per-request console line: one line per finished request, whichever way it ends.

The router runs for real (uvicorn, the official openai client); below it the scripted backend
of `test_api` stands in for the workers, and a static cluster view decides local vs
disaggregated routes exactly as the live one would.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from router.app import create_app
from router.errors import QueueFullError
from tests.router.test_api import MSGS, ScriptedBackend, Server, _config, _workers

LINE = re.compile(
    r"^request (?P<id>(chatcmpl|cmpl)-\S+) status=(?P<status>\d+) route=(?P<route>\w+) "
    r"prompt_tokens=(?P<prompt>\d+) output_tokens=(?P<out>\d+) ttft_ms=(?P<ttft>[\d.]+|-) "
    r"total_ms=(?P<total>[\d.]+) finish=(?P<finish>\S+)( error=(?P<error>\w+))?$"
)


@pytest.fixture(scope="module")
def backend() -> ScriptedBackend:
    return ScriptedBackend()


def _serve(backend: ScriptedBackend, log_requests: bool) -> Server:
    app = create_app(_config(request_timeout_s=5, log_requests=log_requests), backend)
    app.state.router.cluster.update_workers(_workers(("d0", "decode"), ("p0", "prefill")))
    return Server(app)


@pytest.fixture(scope="module")
def server(backend: ScriptedBackend) -> Iterator[Server]:
    with _serve(backend, log_requests=True) as s:
        yield s


def _client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=10)


def _records(caplog: pytest.LogCaptureFixture) -> list[re.Match[str]]:
    found = [r.getMessage() for r in caplog.records if r.name == "splitserve.requests"]
    matches = [LINE.match(line) for line in found]
    assert all(matches), found
    return [m for m in matches if m is not None]


def _wait_records(caplog: pytest.LogCaptureFixture, n: int, timeout: float = 5.0) -> list[re.Match[str]]:
    """The line is written when the server closes the response, which can be a moment after the
    client read its last byte (the server runs on another thread)."""
    deadline = time.monotonic() + timeout
    records = _records(caplog)
    while len(records) < n and time.monotonic() < deadline:
        time.sleep(0.02)
        records = _records(caplog)
    return records


def test_one_line_per_request_with_route_tokens_and_times(
    server: Server, backend: ScriptedBackend, caplog: pytest.LogCaptureFixture
) -> None:
    backend.reset()
    caplog.set_level(logging.INFO, logger="splitserve.requests")
    api = _client(server)
    short = api.chat.completions.create(model="smollm2", messages=MSGS, max_tokens=5)  # type: ignore[arg-type]
    long = api.completions.create(model="smollm2", prompt=list(range(10, 110)), max_tokens=3, stream=True)
    assert len([c for c in long]) >= 3
    (a, b) = _wait_records(caplog, 2)
    assert a["id"] == short.id and a["status"] == "200" and a["route"] == "local"
    assert int(a["prompt"]) == short.usage.prompt_tokens and int(a["out"]) == short.usage.completion_tokens == 5
    assert a["finish"] == "length" and float(a["ttft"]) <= float(a["total"])
    assert b["route"] == "disaggregated" and b["prompt"] == "100" and b["out"] == "3" and b["status"] == "200"


def test_failed_and_refused_requests_are_logged_with_their_status(
    server: Server, backend: ScriptedBackend, caplog: pytest.LogCaptureFixture
) -> None:
    backend.reset()
    caplog.set_level(logging.INFO, logger="splitserve.requests")
    backend.fail_with = QueueFullError()
    with pytest.raises(openai.RateLimitError):
        _client(server).chat.completions.create(model="smollm2", messages=MSGS, max_tokens=5)  # type: ignore[arg-type]
    (m,) = _wait_records(caplog, 1)
    assert m["status"] == "429" and m["error"] == "QueueFullError" and m["out"] == "0" and m["ttft"] == "-"


def test_client_gone_mid_stream_is_499(server: Server, backend: ScriptedBackend,
                                        caplog: pytest.LogCaptureFixture) -> None:
    backend.reset()
    backend.delay = 0.05
    caplog.set_level(logging.INFO, logger="splitserve.requests")
    body = {"model": "smollm2", "messages": MSGS, "stream": True, "max_tokens": 200}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=10) as r:
        for _ in zip(range(3), r.iter_lines()):
            pass
    (m,) = _wait_records(caplog, 1)  # the server notices the disconnect a moment later
    assert m["status"] == "499" and int(m["out"]) < 200 and m["error"] is None


def test_log_requests_off_writes_nothing(backend: ScriptedBackend, caplog: pytest.LogCaptureFixture) -> None:
    backend.reset()
    caplog.set_level(logging.INFO, logger="splitserve.requests")
    with _serve(backend, log_requests=False) as quiet:
        _client(quiet).chat.completions.create(model="smollm2", messages=MSGS, max_tokens=2)  # type: ignore[arg-type]
    assert not [r for r in caplog.records if r.name == "splitserve.requests"]
    assert backend.completed  # the request itself ran
