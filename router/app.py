"""The router's OpenAI-compatible HTTP app.

One request: authenticate, validate (strict pydantic models, OpenAI error bodies), template and
tokenize, check lengths against ``max_model_len``, route once (prefix index + loads), then run
``n`` choices (per prompt) as parallel backend streams merged into one SSE stream or one JSON
body. Routing and queue-full errors surface before the first byte, so they keep their status
(429, 503) even when streaming. A client disconnect or the request timeout closes every
backend stream, which cancels the request on the workers.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import jinja2
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from protocol.control_plane import ControlPlane
from router import protocol as P
from router.admission import Admission, AdmissionGate, AdmissionLimits, Ticket, charge_for
from router.backend import GenerationBackend, TokenDelta, Tokenizer
from router.dispatch import ClusterView, Dispatcher, RoutedPrompt, deadline_after
from router.errors import (
    AuthenticationError,
    BadRequestError,
    ClientDisconnectedError,
    ContextLengthError,
    ModelNotFoundError,
    install_error_handlers,
    to_api_error,
)
from router.json_body import JsonBodyWithoutContentType
from router.limits import BodyLimit, check_batch, check_text_prompt, check_token_prompt, check_unicode
from router.metrics import RouterMetrics
from router.policy import make_policy
from router.render import ChatRenderer, ChoiceJob, CompletionRenderer, Renderer, Tracker, merge_choices
from router.request_log import RequestEntry, RequestLog
from router.settings import RouterSettings

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": P.ErrorResponse, "description": desc}
    for code, desc in [
        (400, "Invalid request"),
        (401, "Missing or invalid API key"),
        (404, "Unknown model"),
        (413, "Request body too large"),
        (429, "Queues full; see Retry-After"),
        (503, "No worker available"),
    ]
}


@dataclass
class RouterState:
    settings: RouterSettings
    backend: GenerationBackend
    cluster: ClusterView
    dispatcher: Dispatcher
    metrics: RouterMetrics
    created: int
    request_log: RequestLog = field(default_factory=lambda: RequestLog(enabled=False))
    admission: Admission = field(default_factory=lambda: Admission(AdmissionLimits()))


class _CountStatus:
    """Counts responses by endpoint and status (pure ASGI: wrapping `send` leaves streaming
    and disconnect detection untouched, unlike BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp, metrics: RouterMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        endpoint = path if path in ("/v1/chat/completions", "/v1/completions", "/v1/models") else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(
    settings: RouterSettings, backend: GenerationBackend, control_plane: ControlPlane | None = None
) -> FastAPI:
    """The router app; with ``control_plane`` None it routes over `app.state.router.cluster`,
    which callers may fill by hand (or leave empty to let the backend pick workers)."""
    cluster = ClusterView(control_plane)
    metrics = RouterMetrics(cluster.workers)
    policy = make_policy(settings.policy, settings.routing)
    dispatcher = Dispatcher(backend, cluster, policy, metrics, max_retries=settings.max_retries,
                            max_migrations=settings.max_migrations, migration_wait_s=settings.migration_wait_s)
    state = RouterState(settings, backend, cluster, dispatcher, metrics, int(time.time()),
                        RequestLog(enabled=settings.log_requests), Admission(settings.admission))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        await cluster.start()
        try:
            yield
        finally:
            await cluster.stop()
            await backend.close()

    app = FastAPI(
        title="splitserve router",
        version="0.1.0",
        description="OpenAI-compatible API over disaggregated prefill and decode pools.",
        lifespan=lifespan,
    )
    app.state.router = state
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(AdmissionGate, admission=state.admission, paths=("/v1/chat/completions", "/v1/completions"))
    app.add_middleware(_CountStatus, metrics=metrics)
    app.add_middleware(JsonBodyWithoutContentType)
    keys = [k.encode() for k in settings.api_keys]

    async def check_api_key(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare against every key: the time taken must not reveal which one nearly matched
        ok = scheme.lower() == "bearer" and any(
            [hmac.compare_digest(token.strip().encode(), k) for k in keys]
        )
        if not ok:
            raise AuthenticationError("invalid or missing API key (Authorization: Bearer <key>)")

    v1 = [Depends(check_api_key)]

    @app.post(
        "/v1/chat/completions",
        response_model=P.ChatCompletionResponse,
        responses={**_ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
        dependencies=v1,
    )
    async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        _check_request(state, body)
        tok = backend.tokenizer
        messages = [_message_dict(m) for m in body.messages]
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True)
        except (jinja2.TemplateError, ValueError, TypeError, KeyError) as e:
            raise BadRequestError(
                f"messages: cannot apply the chat template: {e}", param="messages"
            ) from None
        check_text_prompt(text, settings.max_model_len, "messages")
        ids = await _encode(tok, text, add_special_tokens=False, param="messages")
        renderer = ChatRenderer(P.new_id("chatcmpl"), settings.model_name, tok, body.num_logprobs)
        return await _serve(state, request, body, [ids], "messages", renderer, arrival)

    @app.post(
        "/v1/completions",
        response_model=P.CompletionResponse,
        responses={**_ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
        dependencies=v1,
    )
    async def completions(body: P.CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        _check_request(state, body)
        given = body.prompts()
        check_batch(given, body.n, settings.max_model_len, settings.max_choices_per_request)
        tok = backend.tokenizer
        prompts: list[list[int]] = []
        for p in given:
            prompts.append(await _encode(tok, p, add_special_tokens=True, param="prompt") if isinstance(p, str) else p)
        vocab = getattr(tok, "vocab_size", None)
        if isinstance(vocab, int) and any(t >= vocab for ids in prompts for t in ids):
            raise BadRequestError(f"prompt: token ids must be < vocab size {vocab}", param="prompt")
        renderer = CompletionRenderer(P.new_id("cmpl"), settings.model_name, tok, body.num_logprobs)
        return await _serve(state, request, body, prompts, "prompt", renderer, arrival)

    @app.get("/v1/models", response_model=P.ModelList, responses=_ERROR_RESPONSES, dependencies=v1)
    async def models() -> P.ModelList:
        card = P.ModelCard(id=settings.model_name, created=state.created, max_model_len=settings.max_model_len)
        return P.ModelList(data=[card])

    @app.get("/health", responses={503: {"model": P.ErrorResponse}})
    async def health() -> JSONResponse:
        if not await backend.healthy():
            return JSONResponse({"status": "unavailable", "workers": len(cluster.workers())}, status_code=503)
        why = cluster.degraded()
        if cluster.control_plane is not None and not why:  # a Redis that died since the last poll
            try:
                await asyncio.wait_for(asyncio.to_thread(cluster.control_plane.client.ping), 1.0)
            except Exception:
                why = ["control plane unreachable"]
        status: dict[str, object] = {"status": "degraded" if why else "ok", "workers": len(cluster.workers())}
        if why:
            status["reasons"] = why
        return JSONResponse(status, status_code=503 if why else 200)

    @app.get("/metrics", response_class=Response, include_in_schema=False)
    async def prometheus() -> Response:
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    return app


def _check_request(state: RouterState, body: P.ChatCompletionRequest | P.CompletionRequest) -> None:
    """The cheap checks, before templating or tokenizing anything."""
    check_unicode(body)
    _check_model(state, body.model)


def _check_model(state: RouterState, model: str) -> None:
    if not state.settings.serves(model):
        raise ModelNotFoundError(
            f"model {model!r} does not exist; this server serves {state.settings.model_name!r}", param="model"
        )


def _message_dict(m: P.ChatMessage) -> dict[str, Any]:
    d: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.name:
        d["name"] = m.name
    return d


async def _encode(tok: Tokenizer, text: str, add_special_tokens: bool, param: str) -> list[int]:
    try:
        # long prompts tokenize in a thread so one big request cannot stall every stream
        if len(text) > 8192:
            return await asyncio.to_thread(tok.encode, text, add_special_tokens=add_special_tokens)
        return tok.encode(text, add_special_tokens=add_special_tokens)
    except InvalidRequestError as e:  # the tokenizer names no field: it cannot tell messages from prompt
        raise BadRequestError(f"{param}: {str(e).removeprefix('prompt: ')}", param=param) from None


_SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "min_tokens", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
)  # fmt: skip


def _sampling_params(body: P.ChatCompletionRequest | P.CompletionRequest, max_tokens: int) -> SamplingParams:
    given = {name: getattr(body, name) for name in _SAMPLING_FIELDS if getattr(body, name) is not None}
    return SamplingParams(
        n=1,
        max_tokens=max_tokens,
        stop=tuple(body.stop_list),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        logprobs=body.num_logprobs,
        **given,
    )


async def _serve(
    state: RouterState,
    request: Request,
    body: P.ChatCompletionRequest | P.CompletionRequest,
    prompts: list[list[int]],
    prompt_param: str,
    renderer: Renderer,
    arrival: float,
) -> Response:
    max_len = state.settings.max_model_len
    jobs: list[ChoiceJob] = []
    for ids in prompts:
        if not ids:
            raise BadRequestError(f"{prompt_param}: the prompt is empty", param=prompt_param)
        check_token_prompt(ids, max_len, prompt_param)
        want = body.max_new_tokens
        if want is not None and len(ids) + want > max_len:
            field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            raise ContextLengthError(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{len(ids) + want} tokens ({len(ids)} in the prompt, {want} for the completion).",
                param=field,
            )
        try:
            params = _sampling_params(body, want if want is not None else max_len - len(ids))
        except InvalidRequestError as e:
            raise to_api_error(e) from None
        routed: RoutedPrompt = state.dispatcher.route(ids)
        for i in range(body.n):
            try:
                child = params.for_child(i)
            except InvalidRequestError as e:
                raise to_api_error(e) from None
            jobs.append(ChoiceJob(len(jobs), routed, child))
    state.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
    request_id = renderer.response_id
    deadline = deadline_after(state.settings.request_timeout_s)
    # 429 here, before any worker is contacted
    state.admission.arrived(request.scope.setdefault("state", {}))
    ticket = state.admission.admit([charge_for(j.routed.decision, len(j.routed.prompt_token_ids)) for j in jobs])
    streams = [
        ticket.meter(j.index, state.dispatcher.stream(j.routed, f"{request_id}-{j.index}", j.params, deadline))
        for j in jobs
    ]
    merged = merge_choices(streams, request, deadline)
    prompt_tokens = sum(len(p) for p in prompts)
    state.metrics.running.inc()
    entry = state.request_log.begin(request_id, prompt_tokens, [j.routed.decision for j in jobs], arrival)
    try:
        first = await anext(merged)  # routing/admission errors raise here, before any byte is sent
    except StopAsyncIteration:
        first = None
    except BaseException as e:
        state.metrics.running.dec()
        ticket.release()
        await merged.aclose()
        entry.end(e)
        raise
    tracker = entry.tracker = renderer.start(len(jobs), prompt_tokens, arrival, state.metrics)
    if not body.stream:
        try:
            if first is not None:
                tracker.add(*first)
                async for index, delta in merged:
                    tracker.add(index, delta)
        except BaseException as e:
            entry.error = e
            raise
        finally:
            ticket.release()
            await merged.aclose()
            tracker.finish()
            state.metrics.running.dec()
            entry.end()
        return JSONResponse(renderer.response(tracker))
    closer = _Closer(merged, tracker, state.metrics, entry, ticket)
    return _SSEResponse(_sse(renderer, tracker, first, merged, body.include_usage, closer), closer)


class _Closer:
    """Idempotent end of a streamed request, run by the SSE generator or, if the response
    never got to iterate it (client gone before the headers), by the response itself."""

    def __init__(
        self, merged: AsyncIterator[Any], tracker: Tracker, metrics: RouterMetrics, entry: RequestEntry,
        ticket: Ticket,
    ) -> None:
        self.merged, self.tracker, self.metrics, self.entry = merged, tracker, metrics, entry
        self.ticket = ticket
        self.done = False

    async def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        self.ticket.release()
        try:
            await self.merged.aclose()  # type: ignore[attr-defined]
        finally:
            self.tracker.finish()
            self.metrics.running.dec()
            self.entry.end()


class _SSEResponse(StreamingResponse):
    def __init__(self, content: AsyncIterator[str], closer: _Closer) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.closer = closer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except BaseException as e:  # cancelled: the client went away mid-stream
            self.closer.entry.error = self.closer.entry.error or e
            raise
        finally:
            await self.closer()


async def _sse(
    renderer: Renderer,
    tracker: Tracker,
    first: tuple[int, TokenDelta] | None,
    merged: AsyncIterator[tuple[int, TokenDelta]],
    include_usage: bool,
    closer: _Closer,
) -> AsyncIterator[str]:
    try:
        try:
            if first is not None:
                for chunk in renderer.chunks(tracker, *first, include_usage):
                    yield _event(chunk)
                async for index, delta in merged:
                    for chunk in renderer.chunks(tracker, index, delta, include_usage):
                        yield _event(chunk)
        except ClientDisconnectedError as e:
            closer.entry.error = e
            return
        except Exception as e:  # mid-stream failure: the status is already sent, report in-band
            closer.entry.error = e
            yield _event(to_api_error(e).body())
        else:
            if include_usage:
                yield _event(renderer.usage_chunk(tracker))
        yield "data: [DONE]\n\n"
    finally:
        await closer()


def _event(obj: Any) -> str:
    payload = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {payload}\n\n"
