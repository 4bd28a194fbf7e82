"""Bounded admission at the router: the counts (`router.admission`) and, through the HTTP app with a
scripted backend, 429 + Retry-After at once for the excess and every count given back exactly once
however a request ends (completion, error, timeout, client disconnect)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from protocol.registry import LoadSnapshot, WorkerInfo
from router.admission import Admission, AdmissionLimits, Charge, charge_for
from router.app import create_app
from router.errors import QueueFullError, ServiceUnavailableError
from router.policy import RouteDecision
from tests.router.test_api import CHAT, OK_CHAT, ScriptedBackend, Server, _assert_error, _config, _wait_for


# ------------------------------------------------------------------------------- the counts
def test_in_flight_limit_refuses_the_excess_and_release_gives_back_once() -> None:
    adm = Admission(AdmissionLimits(max_in_flight_requests=3, max_queued_prompt_tokens=0))
    a = adm.admit([Charge("decode", 10)] * 2)
    b = adm.admit([Charge("decode", 10)])
    with pytest.raises(QueueFullError, match="max_in_flight_requests=3") as e:
        adm.admit([Charge("decode", 1)])
    assert e.value.headers()["Retry-After"] == "1"
    assert (adm.in_flight, adm.rejected) == (3, 1)
    a.release()
    a.release()  # idempotent
    assert adm.in_flight == 1
    c = adm.admit([Charge("decode", 1)] * 2)
    b.release()
    c.release()
    assert adm.in_flight == 0 and adm.queued_tokens == {"prefill": 0, "decode": 0}


def test_prompt_tokens_queue_per_pool_until_the_first_token() -> None:
    adm = Admission(AdmissionLimits(max_in_flight_requests=0, max_queued_prompt_tokens=100))
    t = adm.admit([Charge("prefill", 60), Charge("prefill", 30)])
    adm.admit([Charge("decode", 90)]).release()  # the other pool has its own budget
    with pytest.raises(QueueFullError, match="prefill pool"):
        adm.admit([Charge("prefill", 20)])
    t.prefilled(0)
    t.prefilled(0)  # a second delta of the same sequence gives nothing back again
    assert adm.queued_tokens["prefill"] == 30
    u = adm.admit([Charge("prefill", 20)])
    t.release()
    u.release()
    assert adm.queued_tokens == {"prefill": 0, "decode": 0} and adm.in_flight == 0


def test_a_request_larger_than_a_limit_runs_when_its_pool_is_idle() -> None:
    adm = Admission(AdmissionLimits(max_in_flight_requests=2, max_queued_prompt_tokens=100))
    big = adm.admit([Charge("prefill", 500)] * 4)  # alone: could never run otherwise
    with pytest.raises(QueueFullError):
        adm.admit([Charge("decode", 1)])
    big.release()
    assert adm.in_flight == 0 and adm.queued_tokens["prefill"] == 0


def test_charge_pool_follows_the_route() -> None:
    assert charge_for(None, 5) == Charge("decode", 5)
    assert charge_for(RouteDecision("d0", None, 0), 5).pool == "decode"
    assert charge_for(RouteDecision("d0", "p0", 0), 7) == Charge("prefill", 7)


@pytest.mark.parametrize("field", ["max_in_flight_requests", "max_queued_prompt_tokens"])
def test_negative_limit_is_refused_naming_the_field(field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: must be >= 0"):
        AdmissionLimits(**{field: -1})


# ------------------------------------------------------------------------------- through HTTP
@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend()


@pytest.fixture
def server(backend: ScriptedBackend) -> Iterator[Server]:
    settings = _config(request_timeout_s=5, admission=AdmissionLimits(max_in_flight_requests=4))
    with Server(create_app(settings, backend)) as s:
        yield s


def _admission(server: Server) -> Admission:
    return server.app.state.router.admission


def _idle(server: Server) -> bool:
    adm = _admission(server)
    return adm.in_flight == 0 and adm.arriving == 0 and not any(adm.queued_tokens.values())


def test_overload_excess_gets_429_at_once_and_the_admitted_finish(server: Server, backend: ScriptedBackend) -> None:
    backend.delay = 0.02  # each admitted request streams for ~0.3 s

    async def one(c: httpx.AsyncClient, stream: bool) -> tuple[int, float, str | None]:
        t0 = time.monotonic()
        r = await c.post(f"{server.url}{CHAT}", json={**OK_CHAT, "max_tokens": 16, "stream": stream})
        return r.status_code, time.monotonic() - t0, r.headers.get("retry-after")

    async def burst() -> list[tuple[int, float, str | None]]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as c:
            return await asyncio.gather(*(one(c, i % 2 == 0) for i in range(40)))

    results = asyncio.run(burst())
    codes = [r[0] for r in results]
    assert set(codes) <= {200, 429}, codes
    assert 4 <= codes.count(200) < 40 and codes.count(429) > 0
    assert all(r[2] == "1" for r in results if r[0] == 429)
    assert max(r[1] for r in results if r[0] == 429) < 1.0  # refused at once, not queued behind the 200s
    assert _admission(server).rejected == codes.count(429)
    assert _wait_for(lambda: _idle(server))


def test_counts_come_back_after_errors_timeouts_and_disconnects(server: Server, backend: ScriptedBackend) -> None:
    backend.fail_with = ServiceUnavailableError("boom")
    _assert_error(httpx.post(f"{server.url}{CHAT}", json=OK_CHAT, timeout=10), 503)
    backend.fail_with = None
    backend.delay = 0.05
    with pytest.raises(httpx.ReadTimeout):  # non-stream client gone
        httpx.post(f"{server.url}{CHAT}", json={**OK_CHAT, "max_tokens": 200}, timeout=0.3)
    body = {**OK_CHAT, "stream": True, "max_tokens": 200, "n": 2}
    with httpx.stream("POST", f"{server.url}{CHAT}", json=body, timeout=10) as r:  # stream client gone
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    assert _wait_for(lambda: _idle(server)), _admission(server).__dict__
    # the budget is whole again: four sequences fit
    backend.delay = 0.0
    r = httpx.post(f"{server.url}{CHAT}", json={**OK_CHAT, "n": 4, "max_tokens": 2}, timeout=10)
    assert r.status_code == 200 and len(r.json()["choices"]) == 4
    assert _idle(server)


def test_router_accounting_is_not_the_heartbeats(server: Server, backend: ScriptedBackend) -> None:
    """Workers whose heartbeats say idle do not make the router admit past its own count."""
    info = WorkerInfo("d0", "decode", "h:1", num_blocks=100, block_size=16)
    server.app.state.router.cluster.update_workers([(info, LoadSnapshot(free_blocks=100, total_blocks=100))])
    backend.delay = 0.05
    body = {**OK_CHAT, "stream": True, "max_tokens": 100}
    with httpx.Client(timeout=10) as c, c.stream("POST", f"{server.url}{CHAT}", json={**body, "n": 4}) as held:
        assert held.status_code == 200
        _assert_error(c.post(f"{server.url}{CHAT}", json=OK_CHAT), 429, code="queue_full")
    assert _wait_for(lambda: _idle(server))


def test_gate_refuses_before_reading_the_body_while_full(server: Server, backend: ScriptedBackend) -> None:
    backend.delay = 0.05
    body = {**OK_CHAT, "stream": True, "max_tokens": 100, "n": 4}
    with httpx.Client(timeout=10) as c, c.stream("POST", f"{server.url}{CHAT}", json=body) as held:
        assert held.status_code == 200
        t0 = time.monotonic()
        r = c.post(f"{server.url}/v1/completions", content=b"{not json")  # never parsed: refused first
        assert time.monotonic() - t0 < 0.5
        _assert_error(r, 429, code="queue_full")
        assert r.headers["retry-after"] == "1"
        assert c.get(f"{server.url}/v1/models").status_code == 200  # other routes are not gated
    assert _wait_for(lambda: _idle(server))
