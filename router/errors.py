"""Every failure the router reports, and its OpenAI-shaped HTTP response.

Clients (the official SDKs included) branch on the status code and read
``{"error": {"message", "type", "param", "code"}}``; FastAPI's defaults (422 with a ``detail``
list, plain-text 500s) match neither. So every exception the HTTP layer can see is mapped
here, and client mistakes always land on a 4xx: a 500 means a bug or a dead backend.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import InvalidRequestError, PromptTooLongError

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthError(BadRequestError):
    """Prompt, or prompt plus requested tokens, over max_model_len."""

    code = "context_length_exceeded"


class AuthenticationError(APIError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class NotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"


class QueueFullError(APIError):
    """Every eligible worker's queue is full: the client should back off and retry."""

    status_code = 429
    error_type = "rate_limit_exceeded"
    code = "queue_full"

    def __init__(self, message: str = "server is busy; retry later", *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class ServiceUnavailableError(APIError):
    """No live worker can take the request (none registered, or all failed)."""

    status_code = 503
    error_type = "service_unavailable"


class NoWorkersError(ServiceUnavailableError):
    code = "no_workers"


class RequestTimeoutError(APIError):
    status_code = 504
    error_type = "timeout"
    code = "request_timeout"


class ClientDisconnectedError(APIError):
    """The client went away; the request was cancelled and nobody reads the answer."""

    status_code = 499
    error_type = "client_closed_request"


class PrefillFailedError(ServiceUnavailableError):
    """Raised by a backend when the prefill worker failed before the first token.

    The router retries on another prefill worker, or prefills on the decode worker.
    """

    code = "prefill_failed"

    def __init__(self, worker_id: str, message: str | None = None) -> None:
        super().__init__(message or f"prefill worker {worker_id} failed")
        self.worker_id = worker_id


class WorkerUnavailableError(ServiceUnavailableError):
    """Raised by a backend when the decode worker failed before the first token (router retries)."""

    code = "worker_unavailable"

    def __init__(self, worker_id: str, message: str | None = None) -> None:
        super().__init__(message or f"decode worker {worker_id} is unavailable")
        self.worker_id = worker_id


class WorkerLostError(ServiceUnavailableError):
    """The decode worker failed after streaming tokens (the stream broke, it answered
    UNAVAILABLE, or it left the registry): the router migrates the request (`router.migration`)."""

    code = "worker_lost"

    def __init__(self, worker_id: str, address: str, message: str | None = None) -> None:
        super().__init__(message or f"decode worker {worker_id} at {address} was lost mid-stream")
        self.worker_id = worker_id
        self.address = address


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception the request path can raise to the error we report."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, PromptTooLongError):
        return ContextLengthError(str(exc), param="messages")
    if isinstance(exc, InvalidRequestError):
        # engine messages start with the field name ("top_p: must be ...")
        head = str(exc).split(":", 1)[0]
        return BadRequestError(str(exc), param=head if head.isidentifier() else None)
    log.exception("internal error", exc_info=exc)
    return APIError("internal server error")


def error_response(exc: BaseException) -> JSONResponse:
    err = to_api_error(exc)
    return JSONResponse(err.body(), status_code=err.status_code, headers=err.headers())


def _param_path(loc: tuple[Any, ...]) -> str:
    """``("body", "messages", 0, "content")`` -> ``messages[0].content``.

    Union members show up in pydantic locations as type tags (``str``, ``list[int]``,
    ``TextContentPart``); field names are snake_case, so anything else is dropped.
    """
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p != "body" and isinstance(p, str) and p.isidentifier() and p.islower() and p not in _TYPE_TAGS:
            out += f".{p}" if out else p
    return out


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = list(exc.errors())
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg', ''))}", None
    param = _param_path(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        msg = "field required"
    elif first.get("type") == "extra_forbidden":
        msg = "unrecognized request argument"
    head, sep, rest = msg.partition(": ")
    if not param and sep and head.isidentifier():
        param, msg = head, rest  # model-level checks name their field as "field: message"
    text = f"{param}: {msg}" if param else msg
    # a union mismatch reports once per member; one message per field is enough
    others = {_param_path(tuple(e.get("loc", ()))) for e in errors[1:]} - {param, ""}
    if others:
        text += f" (and errors in: {', '.join(sorted(others)[:5])})"
    return text, param or None


_FASTAPI_PARSE_ERROR = "There was an error parsing the body"


def install_error_handlers(app: FastAPI) -> None:
    """Replace FastAPI's 422/500 shapes with OpenAI's error body."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(BadRequestError(message, param=param))

    @app.exception_handler(json.JSONDecodeError)
    async def _bad_json(_: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return error_response(BadRequestError(f"invalid JSON body: {exc.msg}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        cls = NotFoundError if exc.status_code == 404 else BadRequestError
        detail = str(exc.detail)
        if detail == _FASTAPI_PARSE_ERROR:  # json.loads raised something other than JSONDecodeError
            detail = "invalid JSON body: cannot be parsed (not UTF-8, or nested too deeply)"
        err = cls(detail)
        err.status_code = exc.status_code
        if exc.status_code == 405:
            err.code = "method_not_allowed"
        return JSONResponse(err.body(), status_code=exc.status_code, headers=dict(exc.headers or {}))

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(InvalidRequestError)
    async def _engine_invalid(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)
