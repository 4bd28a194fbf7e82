"""The router's HTTP API end to end: uvicorn on a free port, the official openai client, raw
httpx for malformed input, a scripted backend (below the unit under test), schemathesis fuzzing.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import schemathesis
import uvicorn
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from cluster.redis_server import EmbeddedRedis, free_port
from engine.block_hash import prompt_block_hashes
from protocol.control_plane import ControlPlane
from protocol.registry import KVEvent, KVEventBatch, LoadSnapshot, WorkerInfo
from protocol.stream import TokenLogprob
from router.app import create_app
from router.backend import GenerateRequest, GenerationBackend, TokenDelta
from router.errors import PrefillFailedError, QueueFullError, WorkerUnavailableError
from router.policy import PolicySettings
from router.settings import RouterSettings

SCRIPT = "The quick brown fox jumps over the lazy dog."
MAX_LEN = 256
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


class TinyTokenizer:
    """A byte-level BPE trained in-process, with a ChatML template (the real one is not under test)."""

    def __init__(self) -> None:
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(
            [SCRIPT, "Hello there, how are you today?", "user assistant system"] * 5, trainer
        )
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eos_token_ids = [tok.token_to_id("<|im_end|>")]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


class ScriptedBackend(GenerationBackend):
    """Replays SCRIPT (rotated by the seed) one token per delta, then EOS; applies stop strings
    as the engine would; records requests and which streams were closed or completed."""

    def __init__(self) -> None:
        self._tok = TinyTokenizer()
        self.script = self._tok.encode(SCRIPT, add_special_tokens=False)
        self.reset()

    def reset(self) -> None:
        self.requests: list[GenerateRequest] = []
        self.closed: list[str] = []
        self.completed: list[str] = []
        self.delay = 0.0
        self.fail_with: Exception | None = None
        self.failing_prefill: set[str] = set()
        self.failing_decode: set[str] = set()

    @property
    def tokenizer(self) -> TinyTokenizer:
        return self._tok

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        self.requests.append(request)
        try:
            if self.fail_with is not None:
                raise self.fail_with
            if request.prefill_worker_id in self.failing_prefill:
                raise PrefillFailedError(request.prefill_worker_id)
            if request.decode_worker_id in self.failing_decode:
                raise WorkerUnavailableError(request.decode_worker_id)
            p = request.sampling_params
            start, text = (p.seed or 0) % len(self.script), ""
            for k in range(p.max_tokens or MAX_LEN):
                if self.delay:
                    await asyncio.sleep(self.delay)
                tid = (
                    self.script[(start + k) % len(self.script)]
                    if k < len(self.script)
                    else self._tok.eos_token_ids[0]
                )
                piece = self._tok.decode([tid])
                finish = "stop" if k == len(self.script) else ("length" if k + 1 == p.max_tokens else None)
                hits = [i for i in (f"{text}{piece}".find(s) for s in p.stop) if i >= 0]
                if hits:
                    piece, finish = f"{text}{piece}"[len(text) : min(hits)], "stop"
                text += piece
                lps = None
                if p.logprobs is not None:
                    lps = [TokenLogprob(-0.25, {tid: -0.25, 5: -1.5, 6: -2.5, 7: -3.5, 8: -4.5})]
                yield TokenDelta(
                    [tid], piece, lps, finish, request.expected_cached_tokens if k == 0 else None
                )
                if finish:
                    break
            self.completed.append(request.request_id)
        finally:
            self.closed.append(request.request_id)


class Server:
    """uvicorn in a thread on a free port."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _config(**settings: Any) -> RouterSettings:
    return RouterSettings(max_model_len=MAX_LEN, routing=PolicySettings(disagg_threshold=32), **settings)


@pytest.fixture(scope="module")
def backend() -> ScriptedBackend:
    return ScriptedBackend()


@pytest.fixture(scope="module")
def server(backend: ScriptedBackend) -> Iterator[Server]:
    with Server(create_app(_config(request_timeout_s=5), backend)) as s:
        yield s


@pytest.fixture(autouse=True)
def _reset(backend: ScriptedBackend) -> None:
    backend.reset()


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=10)


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def _prompt_len(backend: ScriptedBackend, messages: list[dict[str, Any]]) -> int:
    tok = backend.tokenizer
    return len(tok.encode(tok.apply_chat_template(messages), add_special_tokens=False))


def _wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


# ------------------------------------------------------------------------------- happy paths
def test_chat_non_stream(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    r = client.chat.completions.create(model="smollm2", messages=MSGS)  # type: ignore[arg-type]
    assert r.object == "chat.completion" and r.model == "smollm2" and r.id.startswith("chatcmpl-")
    [c] = r.choices
    assert (c.message.role, c.message.content, c.finish_reason) == ("assistant", SCRIPT, "stop")
    assert r.usage is not None
    assert r.usage.prompt_tokens == _prompt_len(backend, MSGS) == len(backend.requests[0].prompt_token_ids)
    assert r.usage.completion_tokens == len(backend.script) + 1  # the EOS counts
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # no max_tokens: the rest of the context window
    assert backend.requests[0].sampling_params.max_tokens == MAX_LEN - r.usage.prompt_tokens


def test_sampling_params_forwarded(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    client.chat.completions.create(
        model="smollm2", messages=MSGS, max_completion_tokens=7, temperature=0.5, top_p=0.9, seed=11,
        presence_penalty=0.5, frequency_penalty=-0.5, stop=["zzz"], extra_body={"top_k": 5},
    )  # type: ignore[arg-type]  # fmt: skip
    p = backend.requests[0].sampling_params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (7, 0.5, 0.9, 5, 11)
    assert (p.presence_penalty, p.frequency_penalty, p.stop, p.n, p.logprobs) == (
        0.5,
        -0.5,
        ("zzz",),
        1,
        None,
    )


def test_max_tokens_and_stop(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="smollm2", messages=MSGS, max_tokens=3)  # type: ignore[arg-type]
    assert r.choices[0].finish_reason == "length" and r.usage and r.usage.completion_tokens == 3
    r = client.completions.create(model="smollm2", prompt="Hello", stop=" fox", max_tokens=50)
    assert r.choices[0].text == "The quick brown" and r.choices[0].finish_reason == "stop"


def test_chat_stream_with_usage(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    chunks = list(
        client.chat.completions.create(
            model="smollm2", messages=MSGS, stream=True, stream_options={"include_usage": True}
        )  # type: ignore[arg-type]
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == SCRIPT
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == len(backend.script) + 1
    assert last.usage.prompt_tokens == _prompt_len(backend, MSGS)
    assert all(ch.usage is None for ch in chunks[:-1])


def test_stream_without_usage_and_done_marker(server: Server) -> None:
    body = {"model": "smollm2", "messages": MSGS, "stream": True, "max_tokens": 4}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert all(p["choices"] for p in payloads)  # no usage chunk without include_usage


def test_completions(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    r = client.completions.create(model="smollm2", prompt="Hello there", max_tokens=5)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.choices[0].text == backend.tokenizer.decode(backend.script[:5])
    assert r.usage and r.usage.prompt_tokens == len(backend.tokenizer.encode("Hello there"))
    # token-id prompts and batches: one choice per prompt, in order
    r = client.completions.create(model="smollm2", prompt=[[5, 6, 7], [8, 9]], max_tokens=2)
    assert [c.index for c in r.choices] == [0, 1] and r.usage and r.usage.prompt_tokens == 5
    assert [q.prompt_token_ids for q in backend.requests[-2:]] == [[5, 6, 7], [8, 9]]


def test_completions_stream(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model="smollm2", prompt="Hi", max_tokens=6, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "The quick brown fox jumps over"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_n_parallel_choices(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    r = client.chat.completions.create(model="smollm2", messages=MSGS, n=2, seed=1, max_tokens=3)  # type: ignore[arg-type]
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content  # seeds 1 and 2
    assert r.usage and r.usage.completion_tokens == 6 and r.usage.prompt_tokens == _prompt_len(backend, MSGS)
    assert sorted(q.sampling_params.seed for q in backend.requests) == [1, 2]
    stream = client.chat.completions.create(model="smollm2", messages=MSGS, n=2, max_tokens=3, stream=True)  # type: ignore[arg-type]
    texts = ["", ""]
    for ch in stream:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
    assert texts[0] == texts[1] == backend.tokenizer.decode(backend.script[:3])


def test_chat_logprobs(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    r = client.chat.completions.create(
        model="smollm2", messages=MSGS, max_tokens=4, logprobs=True, top_logprobs=2
    )  # type: ignore[arg-type]
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    for lp, tid in zip(content, backend.script):
        assert lp.token == backend.tokenizer.decode([tid]) and lp.logprob == -0.25
        assert lp.bytes == list(lp.token.encode())
        assert [t.logprob for t in lp.top_logprobs] == [-0.25, -1.5]
    assert backend.requests[0].sampling_params.logprobs == 2
    r = client.chat.completions.create(model="smollm2", messages=MSGS, max_tokens=2)  # type: ignore[arg-type]
    assert r.choices[0].logprobs is None


def test_completion_logprobs_stream(client: openai.OpenAI) -> None:
    r = client.completions.create(model="smollm2", prompt="Hi", max_tokens=3, logprobs=3)
    lp = r.choices[0].logprobs
    assert lp is not None and len(lp.tokens or []) == len(lp.token_logprobs or []) == 3
    assert all(len(t) <= 3 for t in lp.top_logprobs or []) and lp.text_offset == [0, 3, 9]
    chunks = list(
        client.completions.create(model="smollm2", prompt="Hi", max_tokens=3, logprobs=1, stream=True)
    )
    assert (
        sum(len(c.choices[0].logprobs.tokens or []) for c in chunks if c.choices and c.choices[0].logprobs)
        == 3
    )


def test_models_and_health(client: openai.OpenAI, server: Server) -> None:
    [m] = client.models.list().data
    assert m.id == "smollm2" and m.object == "model"
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(spec["paths"])


# ------------------------------------------------------------------------------- bad input
def _post(server: Server, path: str, body: Any, **kw: Any) -> httpx.Response:
    if isinstance(body, (dict, list)):
        return httpx.post(f"{server.url}{path}", json=body, timeout=10, **kw)
    return httpx.post(f"{server.url}{path}", content=body, timeout=10, **kw)


def _assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


CHAT = "/v1/chat/completions"
OK_CHAT = {"model": "smollm2", "messages": MSGS}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "smollm2", "messages": [', None),  # malformed JSON
        (b"not json at all", None),
        ([1, 2, 3], None),  # JSON, but not an object
        ({"model": "smollm2"}, "messages"),
        ({"messages": MSGS}, "model"),
        ({**OK_CHAT, "messages": []}, "messages"),
        ({**OK_CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({**OK_CHAT, "messages": [{"content": "x"}]}, "messages[0].role"),
        ({**OK_CHAT, "messages": "hello"}, "messages"),
        ({**OK_CHAT, "max_tokens": "10"}, "max_tokens"),  # wrong type: no coercion
        ({**OK_CHAT, "max_tokens": 0}, "max_tokens"),
        ({**OK_CHAT, "max_completion_tokens": -5}, "max_completion_tokens"),
        ({**OK_CHAT, "stream": "yes"}, "stream"),
        ({**OK_CHAT, "temperature": 2.5}, "temperature"),
        ({**OK_CHAT, "temperature": "hot"}, "temperature"),
        ({**OK_CHAT, "top_p": 0}, "top_p"),
        ({**OK_CHAT, "top_k": -2}, "top_k"),
        ({**OK_CHAT, "n": 0}, "n"),
        ({**OK_CHAT, "n": 1000}, "n"),
        ({**OK_CHAT, "presence_penalty": 3}, "presence_penalty"),
        ({**OK_CHAT, "frequency_penalty": -3}, "frequency_penalty"),
        ({**OK_CHAT, "seed": 2**64}, "seed"),
        ({**OK_CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({**OK_CHAT, "stop": [""]}, "stop"),
        ({**OK_CHAT, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({**OK_CHAT, "top_logprobs": 2}, "top_logprobs"),  # needs logprobs=true
        ({**OK_CHAT, "stream_options": {"include_usage": True}}, "stream_options"),  # needs stream
        ({**OK_CHAT, "bogus": 1}, "bogus"),
        ({**OK_CHAT, "tools": [{"type": "function"}]}, "tools"),
        ({**OK_CHAT, "logit_bias": {"5": 1.0}}, "logit_bias"),
    ],
)
def test_chat_bad_input_is_400(server: Server, body: Any, param: str | None) -> None:
    err = _assert_error(_post(server, CHAT, body), 400, param)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "smollm2"}, "prompt"),
        ({"model": "smollm2", "prompt": []}, "prompt"),
        ({"model": "smollm2", "prompt": [-1, 2]}, "prompt"),
        ({"model": "smollm2", "prompt": [1, "a"]}, "prompt"),
        ({"model": "smollm2", "prompt": [100000]}, "prompt"),  # beyond the vocabulary
        ({"model": "smollm2", "prompt": "x", "logprobs": 50}, "logprobs"),
        ({"model": "smollm2", "prompt": "x", "echo": True}, "echo"),
        ({"model": "smollm2", "prompt": "x", "best_of": 3}, "best_of"),
        ({"model": "smollm2", "prompt": ""}, "prompt"),  # tokenizes to nothing
    ],
)
def test_completion_bad_input_is_400(server: Server, body: Any, param: str) -> None:
    _assert_error(_post(server, "/v1/completions", body), 400, param)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_json_body_is_served_whatever_the_content_type(server: Server, content_type: str | None) -> None:
    """As the OpenAI API does: `curl -d` without `-H 'Content-Type: application/json'` works."""
    headers = {} if content_type is None else {"content-type": content_type}
    r = httpx.post(f"{server.url}{CHAT}", content=json.dumps(OK_CHAT).encode(), headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


def test_non_json_body_without_json_content_type_says_json(server: Server) -> None:
    r = _post(server, CHAT, b"model=smollm2", headers={"content-type": "application/x-www-form-urlencoded"})
    err = _assert_error(r, 400)
    assert "json" in err["message"].lower(), err


def test_unknown_model_is_404(client: openai.OpenAI, server: Server) -> None:
    _assert_error(_post(server, CHAT, {**OK_CHAT, "model": "gpt-9"}), 404, "model", "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x")


def test_context_length(server: Server, client: openai.OpenAI) -> None:
    long_prompt = "The quick brown fox " * 200
    err = _assert_error(_post(server, "/v1/completions", {"model": "smollm2", "prompt": long_prompt}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    err = _assert_error(_post(server, CHAT, {**OK_CHAT, "max_tokens": MAX_LEN}), 400, "max_tokens")
    assert err["code"] == "context_length_exceeded" and str(MAX_LEN) in err["message"]
    _assert_error(
        _post(server, CHAT, {**OK_CHAT, "max_completion_tokens": MAX_LEN}), 400, "max_completion_tokens"
    )
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": long_prompt}])


def test_unknown_route_and_method(server: Server) -> None:
    _assert_error(httpx.get(f"{server.url}/v1/nothing"), 404)
    _assert_error(httpx.get(f"{server.url}{CHAT}"), 405)


# ------------------------------------------------------------------------------- auth, 429
def test_api_keys(backend: ScriptedBackend) -> None:
    with Server(create_app(_config(api_keys=["k1", "k2"]), backend)) as s:
        _assert_error(_post(s, CHAT, OK_CHAT), 401, code="invalid_api_key")
        _assert_error(_post(s, CHAT, OK_CHAT, headers={"Authorization": "Bearer nope"}), 401)
        _assert_error(_post(s, CHAT, OK_CHAT, headers={"Authorization": "Basic k1"}), 401)
        _assert_error(httpx.get(f"{s.url}/v1/models"), 401)
        assert _post(s, CHAT, OK_CHAT, headers={"Authorization": "Bearer k2"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="bad", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=f"{s.url}/v1", api_key="k1", max_retries=0)
        assert ok.chat.completions.create(model="smollm2", messages=MSGS).choices  # type: ignore[arg-type]
        assert httpx.get(f"{s.url}/health").status_code == 200  # probes need no key
        assert httpx.get(f"{s.url}/metrics").status_code == 200


def test_queue_full_is_429_with_retry_after(
    server: Server, client: openai.OpenAI, backend: ScriptedBackend
) -> None:
    backend.fail_with = QueueFullError(retry_after_s=2.5)
    r = _post(server, CHAT, OK_CHAT)
    _assert_error(r, 429, code="queue_full")
    assert r.headers["retry-after"] == "3"
    r = _post(server, CHAT, {**OK_CHAT, "stream": True})  # streaming too: before the first byte
    _assert_error(r, 429)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="smollm2", prompt="x")


def test_router_side_queue_full(server: Server) -> None:
    cluster = server.app.state.router.cluster
    info = WorkerInfo("d0", "decode", "h:1", num_blocks=100, block_size=16)
    cluster.update_workers([(info, LoadSnapshot(queued_requests=10_000, total_blocks=100))])
    try:
        r = _post(server, CHAT, OK_CHAT)
        _assert_error(r, 429)
        assert int(r.headers["retry-after"]) >= 1
    finally:
        cluster.update_workers([])


# ------------------------------------------------------------------------------- cancellation
def test_stream_disconnect_closes_backend(server: Server, backend: ScriptedBackend) -> None:
    backend.delay = 0.05
    body = {**OK_CHAT, "stream": True, "max_tokens": 200, "n": 2}
    with httpx.stream("POST", f"{server.url}{CHAT}", json=body, timeout=10) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    assert _wait_for(lambda: len(backend.closed) == 2), backend.closed
    assert backend.completed == []


def test_non_stream_disconnect_closes_backend(server: Server, backend: ScriptedBackend) -> None:
    backend.delay = 0.05
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}{CHAT}", json={**OK_CHAT, "max_tokens": 200}, timeout=0.4)
    assert _wait_for(lambda: len(backend.closed) == 1), backend.closed
    assert backend.completed == []


def test_request_timeout(backend: ScriptedBackend) -> None:
    backend.delay = 0.05
    with Server(create_app(_config(request_timeout_s=0.3), backend)) as s:
        _assert_error(_post(s, CHAT, {**OK_CHAT, "max_tokens": 200}), 504, code="request_timeout")
        assert _wait_for(lambda: len(backend.closed) == 1)
        with httpx.stream("POST", f"{s.url}{CHAT}", json={**OK_CHAT, "stream": True, "max_tokens": 200}) as r:
            events = [line for line in r.iter_lines() if line]
        assert "request_timeout" in events[-2] and events[-1] == "data: [DONE]"


# ------------------------------------------------------------------------------- routing + metrics
def _workers(*spec: tuple[str, str]) -> list[tuple[WorkerInfo, LoadSnapshot]]:
    return [
        (
            WorkerInfo(w, pool, "h:1", num_blocks=1000, block_size=16),
            LoadSnapshot(free_blocks=1000, total_blocks=1000),
        )  # type: ignore[arg-type]
        for w, pool in spec
    ]


def test_routing_and_prefill_retry(server: Server, client: openai.OpenAI, backend: ScriptedBackend) -> None:
    cluster = server.app.state.router.cluster
    cluster.update_workers(_workers(("d0", "decode"), ("d1", "decode"), ("p0", "prefill"), ("p1", "prefill")))
    try:
        prompt = list(range(10, 110))  # 100 tokens: over the 32-token disaggregation threshold
        client.completions.create(model="smollm2", prompt=prompt, max_tokens=2)
        first = backend.requests[-1]
        assert first.decode_worker_id in ("d0", "d1") and first.prefill_worker_id in ("p0", "p1")
        # d1 holds the first 96 tokens: 4 left, under the threshold -> straight to d1, no prefill
        hashes = prompt_block_hashes(prompt, 16)
        cluster.apply_kv_events([KVEventBatch("1-0", "d1", (KVEvent("stored", tuple(hashes)),))])
        r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=2)
        q = backend.requests[-1]
        assert (q.decode_worker_id, q.prefill_worker_id, q.expected_cached_tokens) == ("d1", None, 96)
        assert r.usage and r.usage.prompt_tokens_details and r.usage.prompt_tokens_details.cached_tokens == 96
        # every prefill worker fails: retried on the other, then prefilled on decode
        backend.failing_prefill = {"p0", "p1"}
        backend.requests.clear()
        r = client.completions.create(
            model="smollm2", prompt=[(i * 7) % 300 for i in range(100)], max_tokens=2
        )
        assert r.choices[0].finish_reason == "length"
        assert sorted(filter(None, (q.prefill_worker_id for q in backend.requests))) == ["p0", "p1"]
        assert backend.requests[-1].prefill_worker_id is None
        assert len({q.request_id for q in backend.requests}) == 3
        # a dead decode worker: re-routed to the other one (d1 is preferred: it has the prefix)
        backend.failing_prefill, backend.failing_decode = set(), {"d1"}
        backend.requests.clear()
        client.completions.create(model="smollm2", prompt=prompt, max_tokens=2)
        assert [q.decode_worker_id for q in backend.requests] == ["d1", "d0"]
        # every decode worker dead: 503 after the retries, not a hang
        backend.failing_decode = {"d0", "d1"}
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="smollm2", prompt=prompt, max_tokens=2)
        assert e.value.status_code == 503
    finally:
        cluster.update_workers([])


def test_metrics(server: Server, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="smollm2", messages=MSGS, max_tokens=4)  # type: ignore[arg-type]
    _post(server, CHAT, {"model": "nope", "messages": MSGS})
    cluster = server.app.state.router.cluster
    cluster.update_workers(_workers(("d0", "decode"), ("p0", "prefill")))
    try:
        text = httpx.get(f"{server.url}/metrics").text
    finally:
        cluster.update_workers([])
    for name in (
        "splitserve_time_to_first_token_seconds_bucket",
        "splitserve_time_per_output_token_seconds_bucket",
        "splitserve_e2e_request_latency_seconds_count",
        "splitserve_prompt_tokens_total",
        "splitserve_generation_tokens_total",
        'splitserve_requests_total{endpoint="/v1/chat/completions",status="200"}',
        'splitserve_requests_total{endpoint="/v1/chat/completions",status="404"}',
        'splitserve_worker_kv_usage_ratio{pool="decode",worker="d0"}',
        'splitserve_worker_queued_requests{pool="prefill",worker="p0"}',
        "splitserve_requests_running 0.0",
    ):
        assert name in text, name


def test_control_plane_feeds_routing(backend: ScriptedBackend) -> None:
    """Workers and KV events published to a real Redis reach the router's routing decisions."""
    with EmbeddedRedis() as redis_server:
        cp = ControlPlane.from_url(redis_server.url, ttl_s=5)
        for wid in ("d0", "d1"):
            cp.register_worker(WorkerInfo(wid, "decode", "h:1", num_blocks=1000, block_size=16))
        prompt = list(range(10, 110))
        cp.publish_kv_events("d1", [KVEvent("stored", tuple(prompt_block_hashes(prompt, 16)))])
        app = create_app(_config(), backend, cp)
        with Server(app) as s:
            cluster = app.state.router.cluster
            assert _wait_for(lambda: cluster.index.overlap_blocks("d1", prompt_block_hashes(prompt, 16)) == 6)
            _post(s, "/v1/completions", {"model": "smollm2", "prompt": prompt, "max_tokens": 1})
            assert backend.requests[-1].decode_worker_id == "d1"
            cp.deregister_worker("d1")  # gone from the registry -> gone from the index
            assert _wait_for(lambda: cluster.index.workers() == [])
        cp.close()


# ------------------------------------------------------------------------------- fuzzing
def _served_model(case: Any) -> Any:
    # a random model name is a 404 before anything interesting runs; keep the rest random
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = "smollm2"
    return case


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_fuzz_openapi_no_5xx(server: Server, mode: GenerationMode) -> None:
    """Schemathesis cases from the served schema, 30 per operation: no 5xx, OpenAI error bodies."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    for op in operations:
        if mode is GenerationMode.NEGATIVE and op.method.upper() != "POST":
            continue  # nothing to negate on a GET without parameters
        checks_error_shape = op.path.startswith("/v1/")

        @given(case=op.as_strategy(mode).map(_served_model))
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            response = case.call(timeout=10)
            assert response.status_code < 500, (case.path, case.body, response.text[:500])
            if response.status_code >= 400 and checks_error_shape:  # noqa: B023 - check() runs in this iteration
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        check()
