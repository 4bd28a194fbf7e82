"""Bounds on what one request may cost the router, checked before the expensive work.

A hostile or careless client must get a clear 4xx at once, not cost seconds of CPU first: the
body size is checked before it is parsed (`BodyLimit`), and the shape of a parsed request
(prompts times ``n``, prompt lengths, text that is not Unicode) before anything is
tokenized or routed. Each check raises a `BadRequestError` naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.errors import APIError, BadRequestError, ContextLengthError

# No tokenizer we serve has a token longer than this many characters (SmolLM2's longest: 81), so
# a text prompt longer than max_model_len * this cannot fit and is refused without tokenizing.
MAX_CHARS_PER_TOKEN = 128


class PayloadTooLargeError(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


def check_choices(num_prompts: int, n: int, limit: int) -> None:
    """A batch fans out into ``prompts * n`` streams: each costs a backend stream and a KV slot."""
    if num_prompts * n > limit:
        raise BadRequestError(
            f"prompt: {num_prompts} prompts x n={n} = {num_prompts * n} completions in one request; "
            f"at most {limit} are allowed (split the batch)",
            param="prompt",
        )


def check_batch(prompts: list[str | list[int]], n: int, max_model_len: int, max_choices: int) -> None:
    """A completions batch: its size, then every prompt's length, before any prompt is tokenized."""
    check_choices(len(prompts), n, max_choices)
    for p in prompts:
        if isinstance(p, str):
            check_text_prompt(p, max_model_len, "prompt")
        else:
            check_token_prompt(p, max_model_len, "prompt")


def check_token_prompt(ids: list[int], max_model_len: int, param: str) -> None:
    if len(ids) >= max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens; the prompt has {len(ids)} tokens.",
            param=param,
        )


def check_text_prompt(text: str, max_model_len: int, param: str) -> None:
    """Refuse, before tokenizing, a text that cannot fit in ``max_model_len`` tokens whatever it holds."""
    bound = max_model_len * MAX_CHARS_PER_TOKEN
    if len(text) > bound:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens; the prompt has {len(text)} "
            f"characters, more than any {max_model_len}-token text can hold ({bound}).",
            param=param,
        )


def check_unicode(body: BaseModel) -> None:
    """Strings with lone surrogates (JSON ``"\\ud800"``) cannot be tokenized, sent over gRPC or
    echoed back as UTF-8: refuse them by field path instead of failing deep inside."""
    for path, s in _strings(body, ""):
        if s.isascii():
            continue
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            param = path or None
            raise BadRequestError(
                f"{path}: not valid Unicode (lone surrogate U+{ord(s[e.start]):04X} at character {e.start})",
                param=param,
            ) from None


def _strings(root: Any, root_path: str) -> Iterator[tuple[str, str]]:
    # iterative: the depth of a parsed body is bounded by json's recursion limit, not by ours
    stack: list[tuple[str, Any]] = [(root_path, root)]
    while stack:
        path, obj = stack.pop()
        if isinstance(obj, str):
            yield path, obj
        elif isinstance(obj, BaseModel):
            stack.extend((f"{path}.{k}" if path else k, v) for k, v in obj.__dict__.items())
        elif isinstance(obj, dict):
            stack.extend((f"{path}.{_printable(k)}", v) for k, v in obj.items())
            stack.extend((f"{path} (key)", k) for k in obj if isinstance(k, str))
        elif isinstance(obj, list | tuple):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(obj) if not isinstance(v, int | float))


def _printable(key: Any) -> str:
    return str(key).encode("utf-8", "backslashreplace").decode("utf-8")


class BodyLimit:
    """Pure ASGI middleware: a POST to ``/v1/`` larger than ``max_bytes`` gets 413 before it is
    parsed, from its Content-Length when it has one, else once the streamed bytes pass the limit.
    The body is buffered here (it is parsed whole anyway) and replayed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope.get("path", "").startswith("/v1/"):
            return await self.app(scope, receive, send)
        declared = [v for k, v in scope.get("headers", []) if k.lower() == b"content-length"]
        if declared:
            try:
                size = int(declared[0])
            except ValueError:
                return await _reply(send, BadRequestError("Content-Length: not a number"))
            if size > self.max_bytes:
                return await _reply(send, self._too_large(f"{size} bytes"))
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client gone before the body arrived: nobody to answer
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                return await _reply(send, self._too_large(f"more than {self.max_bytes} bytes"))
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    def _too_large(self, got: str) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"request body too large: {got}; the limit is {self.max_bytes} bytes")


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: disconnect detection reads the real channel

    return replay


async def _reply(send: Send, err: APIError) -> None:
    payload = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if err.status_code == 413:
        headers.append((b"connection", b"close"))  # the unread rest of the body must not be parsed as a request
    await send({"type": "http.response.start", "status": err.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
