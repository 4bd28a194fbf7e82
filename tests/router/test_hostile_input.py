"""Hostile input at the router: the real app and the real SmolLM2 tokenizer over HTTP, a scripted
generation backend below. Every case must end in an OpenAI-shaped 4xx at once, before the
expensive work (parsing, tokenizing, routing) it would otherwise cost."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.tokenizer import Tokenizer, load_tokenizer
from router.app import create_app
from router.limits import MAX_CHARS_PER_TOKEN
from router.policy import PolicySettings
from router.protocol import MAX_STOP_CHARS
from router.settings import RouterSettings
from tests.router.test_api import ScriptedBackend, Server

MAX_LEN = 512
BODY_LIMIT = 1024 * 1024
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


class CountingTokenizer:
    """The real tokenizer, counting the characters it was asked to encode."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.encoded_chars = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tok, name)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encoded_chars += len(text)
        return self.tok.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids)


class RealTokenizerBackend(ScriptedBackend):
    def __init__(self, tok: CountingTokenizer) -> None:
        super().__init__()
        self.real = tok

    @property
    def tokenizer(self) -> CountingTokenizer:  # type: ignore[override]
        return self.real


@pytest.fixture(scope="module")
def backend(smollm2_path: Path) -> RealTokenizerBackend:
    return RealTokenizerBackend(CountingTokenizer(load_tokenizer(smollm2_path)))


@pytest.fixture(scope="module")
def server(backend: RealTokenizerBackend) -> Iterator[Server]:
    settings = RouterSettings(
        max_model_len=MAX_LEN, routing=PolicySettings(disagg_threshold=32), request_timeout_s=10,
        max_body_bytes=BODY_LIMIT, max_choices_per_request=64,
    )
    with Server(create_app(settings, backend)) as s:
        yield s


@pytest.fixture(autouse=True)
def _reset(backend: RealTokenizerBackend) -> None:
    backend.reset()
    backend.real.encoded_chars = 0


def _post(server: Server, path: str, body: Any, **kw: Any) -> tuple[httpx.Response, float]:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()  # ASCII: lone surrogates escaped
    t0 = time.monotonic()
    r = httpx.post(f"{server.url}{path}", content=content, timeout=30, **kw)
    return r, time.monotonic() - t0


def _error(r: httpx.Response, status: int, param: str | None, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["code"] == code, err
    return err


def test_ok_request_still_served(server: Server, backend: RealTokenizerBackend) -> None:
    r, _ = _post(server, CHAT, {"model": "smollm2", "messages": [{"role": "user", "content": "Hi 😀"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] and len(backend.requests) == 1


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, {"messages": [{"role": "user", "content": "hi \ud800 there"}]}, "messages[0].content"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
         "messages[0].content[0].text"),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "stop": "\ud83d"}, "stop"),
        (COMPLETIONS, {"prompt": "\ud800"}, "prompt"),
        (COMPLETIONS, {"prompt": ["fine", "x\udc00"]}, "prompt[1]"),
        (COMPLETIONS, {"prompt": "x", "user": "\ud800"}, "user"),
    ],
)
def test_lone_surrogate_is_400_naming_the_field(
    server: Server, backend: RealTokenizerBackend, path: str, body: dict[str, Any], param: str
) -> None:
    r, _ = _post(server, path, {"model": "smollm2", **body})
    err = _error(r, 400, param)
    assert "lone surrogate" in err["message"] and err["message"].startswith(param), err
    assert backend.real.encoded_chars == 0 and not backend.requests


def test_body_over_limit_with_content_length_is_413_at_once(server: Server, backend: RealTokenizerBackend) -> None:
    body = json.dumps({"model": "smollm2", "prompt": "x" * (10 * 1024 * 1024)}).encode()
    r, took = _post(server, COMPLETIONS, body)
    err = _error(r, 413, None, "request_too_large")
    assert "too large" in err["message"] and str(BODY_LIMIT) in err["message"]
    assert took < 0.1, took
    assert backend.real.encoded_chars == 0 and not backend.requests


def test_streamed_body_over_limit_is_413(server: Server, backend: RealTokenizerBackend) -> None:
    """No Content-Length (chunked): the bytes are counted as they arrive, and the rest is never read."""
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        yield b'{"model": "smollm2", "prompt": "'
        for _ in range(10 * 1024):
            sent += 1024
            yield b"x" * 1024
        yield b'"}'

    t0 = time.monotonic()
    r = httpx.post(f"{server.url}{COMPLETIONS}", content=chunks(), timeout=30)
    took = time.monotonic() - t0
    _error(r, 413, None, "request_too_large")
    assert took < 2.0, took
    assert "request" not in r.headers.get("transfer-encoding", "") and sent <= 10 * 1024 * 1024
    assert backend.real.encoded_chars == 0 and not backend.requests


def test_long_stop_string_is_400(server: Server, backend: RealTokenizerBackend) -> None:
    body = {"model": "smollm2", "prompt": "x", "stop": ["ok", "s" * 1_000_000]}
    r, _ = _post(server, COMPLETIONS, body)
    err = _error(r, 400, "stop")
    assert str(MAX_STOP_CHARS) in err["message"]
    r, _ = _post(server, COMPLETIONS, {"model": "smollm2", "prompt": "x", "stop": "s" * MAX_STOP_CHARS})
    assert r.status_code == 200, r.text
    assert len(backend.requests) == 1


def test_ten_thousand_prompts_is_400_at_once(server: Server, backend: RealTokenizerBackend) -> None:
    r, took = _post(server, COMPLETIONS, {"model": "smollm2", "prompt": ["Hello there"] * 10_000})
    err = _error(r, 400, "prompt")
    assert "10000 prompts" in err["message"] and "at most 64" in err["message"], err
    assert took < 0.5, took
    assert backend.real.encoded_chars == 0 and not backend.requests


def test_prompts_times_n_is_capped(server: Server, backend: RealTokenizerBackend) -> None:
    r, _ = _post(server, COMPLETIONS, {"model": "smollm2", "prompt": ["a", "b", "c"], "n": 22, "max_tokens": 1})
    err = _error(r, 400, "prompt")
    assert "n=22" in err["message"] and "66" in err["message"]
    r, _ = _post(server, COMPLETIONS, {"model": "smollm2", "prompt": ["a", "b", "c"], "n": 21, "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 63


def test_text_prompt_beyond_any_tokenization_is_refused_untokenized(
    server: Server, backend: RealTokenizerBackend
) -> None:
    text = "The quick brown fox. " * (MAX_LEN * MAX_CHARS_PER_TOKEN // 20)  # about 0.7 MB of text
    r, took = _post(server, COMPLETIONS, {"model": "smollm2", "prompt": text})
    err = _error(r, 400, "prompt", "context_length_exceeded")
    assert "characters" in err["message"] and str(MAX_LEN) in err["message"]
    assert backend.real.encoded_chars == 0 and not backend.requests
    assert took < 0.5, took
    r, _ = _post(server, CHAT, {"model": "smollm2", "messages": [{"role": "user", "content": text}]})
    _error(r, 400, "messages", "context_length_exceeded")
    assert backend.real.encoded_chars == 0


def test_long_token_prompt_is_refused_before_any_tokenizing(server: Server, backend: RealTokenizerBackend) -> None:
    """A batch whose token-id prompt is too long is refused before its text prompts are tokenized."""
    body = {"model": "smollm2", "prompt": [[1] * 3, [2] * MAX_LEN]}
    r, _ = _post(server, COMPLETIONS, body)
    err = _error(r, 400, "prompt", "context_length_exceeded")
    assert f"has {MAX_LEN} tokens" in err["message"]
    r, _ = _post(server, COMPLETIONS, {"model": "smollm2", "prompt": [5] * (MAX_LEN * 100)})
    _error(r, 400, "prompt", "context_length_exceeded")
    assert backend.real.encoded_chars == 0 and not backend.requests


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_deeply_nested_json_is_400(server: Server, backend: RealTokenizerBackend, opener: bytes) -> None:
    depth = 100_000
    closer = b"]" if opener == b"[" else b"}"
    body = b'{"model": "smollm2", "messages": ' + opener * depth + b"1" + closer * depth + b"}"
    r, took = _post(server, CHAT, body)
    err = _error(r, 400, None)
    assert "JSON" in err["message"], err
    assert took < 1.0, took
    assert not backend.requests
