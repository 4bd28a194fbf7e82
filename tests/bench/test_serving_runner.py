"""The client and runner of `splitserve bench` against an in-process SSE endpoint (httpx's mock
transport, below the unit under test): stream parsing, usage vs counted tokens, the concurrency
cap, the duration bound, warm-up exclusion, and failures recorded rather than raised."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from bench.serving.arrivals import Arrivals
from bench.serving.client import RequestOptions
from bench.serving.runner import RunOutcome, RunSettings, run
from bench.serving.workload import Prompt

TOKEN_DELAY_S = 0.01


class FakeServer:
    """OpenAI-style streaming for model ``m``; a prompt containing ``FAIL`` breaks mid-stream."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        if body["model"] != "m":
            return httpx.Response(404, json={"error": {"message": f"model {body['model']!r} does not exist"}})
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=self._events(body))

    async def _events(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        # in flight until its last event is out: the client stops reading at [DONE], so a finally
        # clause here would only run when the generator is collected
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        chat = "messages" in body
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        if chat:
            yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for i in range(body["max_tokens"]):
            await asyncio.sleep(TOKEN_DELAY_S)
            if "FAIL" in prompt and i == 2:
                self.in_flight -= 1
                yield _sse({"error": {"message": "worker lost", "type": "server_error"}})
                return
            piece = {"delta": {"content": f" w{i}"}} if chat else {"text": f" w{i}"}
            yield _sse({"choices": [{"index": 0, **piece}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            yield _sse({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": body["max_tokens"]}})
        self.in_flight -= 1
        yield b"data: [DONE]\n\n"


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def _prompts(n: int, out: int = 4, text: str = "hello") -> list[Prompt]:
    return [Prompt(text=f"{text} {i}", input_len=7, output_len=out) for i in range(n)]


def _run(server: FakeServer, prompts: list[Prompt], warmup: list[Prompt] | None = None,
         arrivals: Arrivals | None = None, duration: float | None = None, **options: Any) -> RunOutcome:
    settings = RunSettings("http://fake", duration_s=duration, progress=False)
    opts = RequestOptions(**{"model": "m", **options})
    return asyncio.run(run(settings, opts, arrivals or Arrivals(), prompts, warmup or [],
                           lambda text: len(text.split()), transport=httpx.MockTransport(server)))


def test_completions_stream_is_timed_and_usage_trusted() -> None:
    server = FakeServer()
    out = _run(server, _prompts(3, out=5))
    assert len(out.records) == 3 and out.duration_s > 0
    for r in out.records:
        assert r.ok and r.error is None and r.text == " w0 w1 w2 w3 w4"
        assert r.output_tokens == 5 and r.output_tokens_from == "usage" and r.prompt_tokens == 7
        assert len(r.chunk_times) == 5 and 0 < r.ttft <= r.latency
        assert all(g >= TOKEN_DELAY_S * 0.5 for g in r.itls)
    body = server.bodies[0]
    assert body["stream"] and body["ignore_eos"] and body["max_tokens"] == 5
    assert body["stream_options"] == {"include_usage": True} and body["temperature"] == 0.0


def test_chat_without_usage_counts_tokens_and_skips_role_chunk() -> None:
    server = FakeServer()
    out = _run(server, _prompts(2, out=3), endpoint="chat", include_usage=False, ignore_eos=False)
    for r in out.records:
        assert r.ok and r.output_tokens == 3 and r.output_tokens_from == "tokenizer"
        assert len(r.chunk_times) == 3  # the empty role chunk does not count as the first token
    assert "stream_options" not in server.bodies[0] and "ignore_eos" not in server.bodies[0]
    assert server.bodies[0]["messages"] == [{"role": "user", "content": "hello 0"}]


def test_concurrency_cap_holds_and_warmup_is_not_recorded() -> None:
    server = FakeServer()
    out = _run(server, _prompts(6), warmup=_prompts(3, text="warm"), arrivals=Arrivals(concurrency=2))
    assert server.max_in_flight == 2
    assert len(out.warmup) == 3 and all(r.ok for r in out.warmup)
    assert [r.index for r in out.records] == list(range(6))
    assert len(server.bodies) == 9 and all(b["prompt"].startswith("warm") for b in server.bodies[:3])


def test_duration_bounds_the_run() -> None:
    server = FakeServer()
    out = _run(server, _prompts(100), arrivals=Arrivals(rate=10.0, process="constant"), duration=0.35)
    assert len(out.records) == 4  # due at 0, 0.1, 0.2, 0.3 s
    assert all(r.ok for r in out.records) and out.duration_s < 1.0


def test_failures_are_recorded_not_raised() -> None:
    server = FakeServer()
    out = _run(server, [*_prompts(1), Prompt("FAIL now", 2, 6)])
    ok, broken = out.records
    assert ok.ok and not broken.ok and broken.error == "error event: worker lost"
    wrong = _run(FakeServer(), _prompts(2), model="other")
    assert [r.error for r in wrong.records] == ["HTTP 404: model 'other' does not exist"] * 2


def test_failed_warmup_stops_before_the_run() -> None:
    server = FakeServer()
    out = _run(server, _prompts(5), warmup=_prompts(2), model="other")
    assert out.records == [] and len(out.warmup) == 2 and len(server.bodies) == 2
    assert all(r.error and r.error.startswith("HTTP 404") for r in out.warmup)
