"""Registry poisoning: a process that can write to Redis but does not hold the cluster token
registers a "decode worker" at an address it controls. The router (real app, real Redis with its
password, real gRPC) must never contact that address, so it never hands over the token; the same
record sealed with the token is contacted, with the token, which shows the probe would see it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from cluster.redis_server import EmbeddedRedis
from protocol.control_plane import ControlPlane
from protocol.grpc_auth import TOKEN_HEADER
from protocol.registry import WorkerInfo
from router.settings import RouterSettings
from splitserve.router_server import RouterServer
from splitserve.serve import create_router_app

TOKEN = "the-cluster-token"


class Probe(grpc.GenericRpcHandler):
    """A gRPC server that answers nothing and records every call's method and metadata."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[self])
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        with self._lock:
            self.calls.append((details.method, dict(details.invocation_metadata or ())))

        def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAVAILABLE, "probe")

        return grpc.unary_stream_rpc_method_handler(refuse)


@pytest.fixture
def probe() -> Iterator[Probe]:
    p = Probe()
    p.server.start()
    yield p
    p.server.stop(0)


@pytest.fixture
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as r:
        yield r


@pytest.fixture
def router(redis_server: EmbeddedRedis, smollm2_path: Path) -> Iterator[RouterServer]:
    settings = RouterSettings(max_retries=1, request_timeout_s=20, log_requests=False)
    app, cp = create_router_app(settings, str(smollm2_path), TOKEN, redis_server.url, ttl_s=30.0)
    server = RouterServer(app, "127.0.0.1", 0, on_exit=cp.close).start()
    yield server
    server.stop()


def _decode(wid: str, address: str) -> WorkerInfo:
    return WorkerInfo(wid, "decode", address, num_blocks=1000, block_size=16, max_num_seqs=64)


def _ask(router: RouterServer) -> openai.APIStatusError:
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{router.port}/v1", api_key="x", max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as e:
        api.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    return e.value


def test_unsealed_worker_record_gets_no_traffic_and_no_token(
    redis_server: EmbeddedRedis, router: RouterServer, probe: Probe
) -> None:
    outsider = ControlPlane.from_url(redis_server.url, ttl_s=30.0)  # can write to Redis, has no token
    outsider.register_worker(_decode("decode-evil", probe.address))
    time.sleep(1.0)  # several registry polls of the router
    assert router.app.state.router.cluster.workers() == []
    err = _ask(router)
    assert err.status_code == 503 and err.body["code"] == "no_workers"  # type: ignore[index]
    time.sleep(0.5)
    assert probe.calls == []  # never contacted: the token never left the router

    # control: the same address, sealed by a member, is routed to and gets the token
    member = ControlPlane.from_url(redis_server.url, ttl_s=30.0, token=TOKEN)
    member.register_worker(_decode("decode-good", probe.address))
    deadline = time.monotonic() + 10
    while not router.app.state.router.cluster.workers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [w.worker_id for w in router.app.state.router.cluster.workers()] == ["decode-good"]
    assert _ask(router).status_code == 503
    assert probe.calls and all(md.get(TOKEN_HEADER) == TOKEN for _, md in probe.calls)
    assert probe.calls[0][0].endswith("/Generate")
    outsider.close()
    member.close()
