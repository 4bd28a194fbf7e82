"""`GrpcBackend` against a scripted decode worker (a real gRPC server in this process).

What is under test is the backend contract: proto conversion, the prefill target, the cluster
token, error mapping before/after the first token, and cancellation on ``aclose()``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from cluster.redis_server import free_port
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from protocol.decode_client import FAILED_POOL_HEADER
from protocol.grpc_auth import TokenInterceptor
from protocol.proto import worker_pb2 as pb
from protocol.proto import worker_pb2_grpc as pb_grpc
from protocol.registry import WorkerInfo
from router.backend import GenerateRequest, TokenDelta
from router.errors import (
    PrefillFailedError,
    QueueFullError,
    ServiceUnavailableError,
    WorkerUnavailableError,
)
from router.grpc_backend import GrpcBackend

TOKEN = "secret"


class ScriptedDecode(pb_grpc.DecodeWorkerServicer):
    """Behaviour chosen by the request id's prefix; records what arrived and what was cancelled."""

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []
        self.cancelled = threading.Event()

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        self.requests.append(request)
        kind, _, rest = request.request_id.partition(":")
        lp = [pb.TokenLogprobs(logprob=-0.5, top=[pb.TopLogprob(token_id=7, logprob=-0.5)])]
        if kind == "ok":
            yield pb.GenerateResponse()  # an empty message is skipped
            yield pb.GenerateResponse(token_ids=[7], text="a", logprobs=lp, cached_tokens=32)
            yield pb.GenerateResponse(token_ids=[8, 9], text="bc", logprobs=lp * 2, cached_tokens=32)
            yield pb.GenerateResponse(finish_reason="length", cached_tokens=32)
        elif kind == "abort":
            code, _, message = rest.partition(":")
            if request.HasField("prefill") and "header" in message:
                context.set_trailing_metadata(((FAILED_POOL_HEADER, "prefill"),))
            context.abort(grpc.StatusCode[code], message)
        elif kind == "late":
            yield pb.GenerateResponse(token_ids=[7], text="a")
            context.abort(grpc.StatusCode.UNAVAILABLE, "prefill failed: too late to retry")
        elif kind == "slow":
            context.add_callback(self.cancelled.set)
            yield pb.GenerateResponse(token_ids=[7], text="a")
            deadline = time.monotonic() + 10
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.01)


@pytest.fixture(scope="module")
def decode() -> Iterator[tuple[ScriptedDecode, str]]:
    servicer = ScriptedDecode()
    server = grpc.server(ThreadPoolExecutor(8), interceptors=[TokenInterceptor(TOKEN)])
    pb_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


class FakeTokenizer:
    eos_token_ids = (0,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Any) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return "".join(m["content"] for m in messages)


def _backend(address: str, token: str = TOKEN) -> GrpcBackend:
    workers = {
        "d0": WorkerInfo("d0", "decode", address, 64, 16),
        "p0": WorkerInfo("p0", "prefill", "10.0.0.9:1234", 64, 16),
        "dead": WorkerInfo("dead", "decode", f"127.0.0.1:{free_port()}", 64, 16),
    }
    return GrpcBackend(FakeTokenizer(), token, workers.get)


def _req(rid: str, decode: str = "d0", prefill: str | None = None, **params: Any) -> GenerateRequest:
    sp = SamplingParams(max_tokens=params.pop("max_tokens", 4), **params)
    return GenerateRequest(rid, [1, 2, 3], sp, decode, prefill)


async def _collect(backend: GrpcBackend, req: GenerateRequest) -> list[TokenDelta]:
    try:
        return [d async for d in backend.generate(req)]
    finally:
        await backend.close()


def _run(backend: GrpcBackend, req: GenerateRequest) -> list[TokenDelta]:
    return asyncio.run(_collect(backend, req))


def test_streams_deltas_with_prefill_target_and_logprobs(decode: tuple[ScriptedDecode, str]) -> None:
    servicer, address = decode
    deltas = _run(_backend(address), _req("ok:1", prefill="p0", logprobs=1, temperature=0.5, seed=3))
    assert [d.token_ids for d in deltas] == [[7], [8, 9], []]
    assert "".join(d.text for d in deltas) == "abc" and deltas[-1].finish_reason == "length"
    assert [d.cached_tokens for d in deltas] == [32, None, None]  # first delta only
    assert deltas[1].logprobs is not None and [t for t, _ in deltas[1].token_logprobs()] == [8, 9]
    assert deltas[0].logprobs is not None and deltas[0].logprobs[0].top == {7: -0.5}
    sent = servicer.requests[-1]
    assert sent.prefill.worker_id == "p0" and sent.prefill.address == "10.0.0.9:1234"
    assert list(sent.prompt_token_ids) == [1, 2, 3]
    assert sent.params.seed == 3 and sent.params.temperature == 0.5 and sent.params.max_tokens == 4


def test_without_logprobs_and_without_prefill(decode: tuple[ScriptedDecode, str]) -> None:
    servicer, address = decode
    deltas = _run(_backend(address), _req("ok:2"))
    assert all(d.logprobs is None for d in deltas)
    assert not servicer.requests[-1].HasField("prefill")


@pytest.mark.parametrize(
    ("rid", "prefill", "error"),
    [
        ("abort:INVALID_ARGUMENT:prompt: too long", None, InvalidRequestError),
        ("abort:UNAVAILABLE:prefill failed: peer died", "p0", PrefillFailedError),
        ("abort:UNAVAILABLE:prefill worker p0 refused: mismatch", "p0", PrefillFailedError),
        ("abort:FAILED_PRECONDITION:prefill worker p0 refused: compat", "p0", PrefillFailedError),
        ("abort:UNAVAILABLE:some failure, header says prefill", "p0", PrefillFailedError),
        ("abort:UNAVAILABLE:decode worker is shutting down", "p0", WorkerUnavailableError),
        ("abort:UNAVAILABLE:decode worker is shutting down", None, WorkerUnavailableError),
        ("abort:INTERNAL:decode worker error", None, WorkerUnavailableError),
        ("abort:RESOURCE_EXHAUSTED:queue full", None, QueueFullError),
    ],
)
def test_errors_before_the_first_token(
    decode: tuple[ScriptedDecode, str], rid: str, prefill: str | None, error: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        _run(_backend(decode[1]), _req(rid, prefill=prefill))
    if isinstance(info.value, PrefillFailedError):
        assert info.value.worker_id == "p0"
    if isinstance(info.value, WorkerUnavailableError):
        assert info.value.worker_id == "d0"


def test_error_after_the_first_token_ends_the_stream(decode: tuple[ScriptedDecode, str]) -> None:
    async def main() -> list[TokenDelta]:
        backend = _backend(decode[1])
        got: list[TokenDelta] = []
        try:
            with pytest.raises(ServiceUnavailableError) as info:
                async for d in backend.generate(_req("late:", prefill="p0")):
                    got.append(d)
            # not a retryable error: the client already has tokens
            assert not isinstance(info.value, PrefillFailedError | WorkerUnavailableError)
        finally:
            await backend.close()
        return got

    assert [d.token_ids for d in asyncio.run(main())] == [[7]]


def test_unreachable_and_unknown_workers(decode: tuple[ScriptedDecode, str]) -> None:
    with pytest.raises(WorkerUnavailableError):
        _run(_backend(decode[1]), _req("ok:3", decode="dead"))
    with pytest.raises(WorkerUnavailableError):
        _run(_backend(decode[1]), _req("ok:4", decode="gone"))
    with pytest.raises(PrefillFailedError):
        _run(_backend(decode[1]), _req("ok:5", prefill="gone"))


def test_wrong_token_is_not_retried_as_prefill(decode: tuple[ScriptedDecode, str]) -> None:
    with pytest.raises(WorkerUnavailableError, match="UNAUTHENTICATED"):
        _run(_backend(decode[1], token="wrong"), _req("ok:6", prefill="p0"))


def test_out_of_range_params_are_400(decode: tuple[ScriptedDecode, str]) -> None:
    with pytest.raises(InvalidRequestError, match=r"^top_k"):
        _run(_backend(decode[1]), _req("ok:7", top_k=2**40))


def test_aclose_cancels_the_call_on_the_worker(decode: tuple[ScriptedDecode, str]) -> None:
    servicer, address = decode
    servicer.cancelled.clear()

    async def main() -> None:
        backend = _backend(address)
        agen: AsyncIterator[TokenDelta] = backend.generate(_req("slow:"))
        first = await anext(agen)
        assert first.token_ids == [7]
        await agen.aclose()  # type: ignore[attr-defined]
        await backend.close()

    t0 = time.monotonic()
    asyncio.run(main())
    assert servicer.cancelled.wait(5.0) and time.monotonic() - t0 < 5.0
