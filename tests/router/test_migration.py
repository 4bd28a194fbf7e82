"""Migration by token replay (`router.migration`) through the real `Dispatcher`, `ClusterView`,
policy and metrics, over a scripted backend (below the unit under test) whose workers can be
"killed": a stream lost mid-way continues on another worker (or the same id restarted on a new
address) with the prompt plus the tokens already streamed, and the client sees every token
exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from engine.sampling_params import SamplingParams
from protocol.registry import LoadSnapshot, WorkerInfo
from router.backend import GenerateRequest, GenerationBackend, TokenDelta, Tokenizer
from router.dispatch import ClusterView, Dispatcher
from router.errors import NoWorkersError, ServiceUnavailableError, WorkerLostError
from router.metrics import RouterMetrics
from router.policy import PolicySettings, make_policy

PROMPT = list(range(100, 140))
N_TOKENS = 12


def token_at(prompt_len: int, position: int) -> int:
    """What the scripted model emits at output ``position``: a function of the original prompt
    and the position only, as a greedy engine continuing a resumed request would."""
    return 1000 + prompt_len * 10 + position


class DyingBackend(GenerationBackend):
    """Streams `token_at` for each request; a worker in ``die_after`` loses its stream once that
    many tokens went out, raising what `GrpcBackend` raises for a broken stream."""

    def __init__(self, addresses: dict[str, str]) -> None:
        self.addresses = addresses
        self.die_after: dict[str, int] = {}
        self.hang_after: dict[str, int] = {}
        self.requests: list[GenerateRequest] = []
        self.closed: list[str] = []

    @property
    def tokenizer(self) -> Tokenizer:
        raise NotImplementedError("the dispatcher never tokenizes")

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        self.requests.append(request)
        p = request.sampling_params
        worker = request.decode_worker_id or "?"
        k0 = p.resumed_output_tokens
        prompt_len = len(request.prompt_token_ids) - k0
        try:
            for k in range(k0, p.max_tokens or N_TOKENS):
                if self.die_after.get(worker) == k - k0:
                    raise WorkerLostError(worker, self.addresses.get(worker, ""), "UNAVAILABLE: socket closed")
                if self.hang_after.get(worker) == k - k0:
                    await asyncio.sleep(3600)
                await asyncio.sleep(0)
                finish = "length" if k + 1 == p.max_tokens else None
                yield TokenDelta([token_at(prompt_len, k)], f"<{k}>", None, finish, 7 if k == k0 else None)
        finally:
            self.closed.append(request.request_id)


def _view(workers: dict[str, str]) -> ClusterView:
    view = ClusterView()
    view.update_workers(
        (WorkerInfo(wid, "decode", addr, num_blocks=64, block_size=16), LoadSnapshot(free_blocks=64, total_blocks=64))
        for wid, addr in workers.items()
    )
    return view


def _dispatcher(workers: dict[str, str], **kw: float) -> tuple[Dispatcher, DyingBackend, ClusterView]:
    backend = DyingBackend(dict(workers))
    view = _view(workers)
    policy = make_policy("kv_aware", PolicySettings(block_size=16))
    return Dispatcher(backend, view, policy, RouterMetrics(view.workers), **kw), backend, view  # type: ignore[arg-type]


async def _collect(d: Dispatcher, params: SamplingParams) -> list[TokenDelta]:
    routed = d.route(PROMPT)
    return [delta async for delta in d.stream(routed, "req", params, None)]


def _metric(d: Dispatcher, outcome: str) -> float:
    return d.metrics.migrations.labels(outcome)._value.get()


def test_lost_stream_continues_on_another_worker_without_gap_or_duplicate() -> None:
    d, backend, _ = _dispatcher({"decode-a": "h:1", "decode-b": "h:2"})
    params = SamplingParams(temperature=0, max_tokens=N_TOKENS, seed=3)
    first_pick = d.route(PROMPT).decision
    assert first_pick is not None
    backend.die_after = {first_pick.decode_worker_id: 4}
    deltas = asyncio.run(_collect(d, params))
    tokens = [t for x in deltas for t in x.token_ids]
    assert tokens == [token_at(len(PROMPT), k) for k in range(N_TOKENS)]
    assert [x.text for x in deltas] == [f"<{k}>" for k in range(N_TOKENS)]
    assert deltas[-1].finish_reason == "length"
    assert [x.cached_tokens for x in deltas if x.cached_tokens is not None] == [7]  # first delta only
    first, *moved = backend.requests
    assert len(moved) == 1
    resumed = moved[0]
    assert resumed.decode_worker_id != first.decode_worker_id
    assert resumed.prompt_token_ids == PROMPT + tokens[:4]
    assert resumed.sampling_params.resumed_output_tokens == 4
    assert resumed.sampling_params.seed == 3 and resumed.sampling_params.max_tokens == N_TOKENS
    assert resumed.prefill_worker_id is None  # a resumed prompt is prefilled where it decodes
    assert set(backend.closed) == {r.request_id for r in backend.requests}  # every backend stream closed
    assert _metric(d, "attempted") == len(moved) and _metric(d, "succeeded") == len(moved)
    assert _metric(d, "failed") == 0


def test_gives_up_after_max_migrations_with_a_clear_error() -> None:
    d, backend, _ = _dispatcher({"decode-a": "h:1", "decode-b": "h:2", "decode-c": "h:3"}, max_migrations=1,
                                migration_wait_s=0.2)
    backend.die_after = {"decode-a": 2, "decode-b": 2, "decode-c": 2}

    async def run() -> list[int]:
        got: list[int] = []
        with pytest.raises(ServiceUnavailableError):
            async for x in d.stream(d.route(PROMPT), "req", SamplingParams(max_tokens=N_TOKENS), None):
                got += x.token_ids
        return got

    got = asyncio.run(run())
    assert got == [token_at(len(PROMPT), k) for k in range(4)]  # 2 on each of two workers, no more
    assert _metric(d, "failed") == 1 and _metric(d, "attempted") == 1


def test_waits_for_the_same_worker_restarted_on_a_new_address() -> None:
    d, backend, view = _dispatcher({"decode-0": "h:1"}, migration_wait_s=30.0)
    backend.die_after = {"decode-0": 3}

    async def run() -> list[int]:
        async def restart() -> None:
            await asyncio.sleep(0.3)
            view.update_workers([])  # the registry record expired...
            await asyncio.sleep(0.3)
            backend.die_after = {}
            backend.addresses["decode-0"] = "h:9"
            view.update_workers([(WorkerInfo("decode-0", "decode", "h:9", num_blocks=64, block_size=16), None)])

        task = asyncio.create_task(restart())
        got = [t async for x in d.stream(d.route(PROMPT), "req", SamplingParams(max_tokens=N_TOKENS), None)
               for t in x.token_ids]
        await task
        return got

    assert asyncio.run(run()) == [token_at(len(PROMPT), k) for k in range(N_TOKENS)]
    assert backend.requests[-1].prompt_token_ids == PROMPT + [token_at(len(PROMPT), k) for k in range(3)]


def test_no_worker_back_within_the_wait_is_an_error_not_a_hang() -> None:
    d, backend, _ = _dispatcher({"decode-0": "h:1"}, migration_wait_s=0.3)
    backend.die_after = {"decode-0": 2}

    async def run() -> None:
        async for _ in d.stream(d.route(PROMPT), "req", SamplingParams(max_tokens=N_TOKENS), None):
            pass

    with pytest.raises((NoWorkersError, WorkerLostError)):
        asyncio.run(asyncio.wait_for(run(), 10))
    assert _metric(d, "failed") == 1


def test_a_silent_worker_that_leaves_the_registry_is_migrated(monkeypatch: pytest.MonkeyPatch) -> None:
    import router.migration as migration

    monkeypatch.setattr(migration, "WATCH_S", 0.05)
    d, backend, view = _dispatcher({"decode-a": "h:1", "decode-b": "h:2"})
    first_pick = d.route(PROMPT).decision
    assert first_pick is not None
    stuck = first_pick.decode_worker_id
    backend.hang_after = {stuck: 5}

    async def run() -> list[int]:
        async def drop() -> None:
            await asyncio.sleep(0.3)
            other = next(w for w in ("decode-a", "decode-b") if w != stuck)
            view.update_workers([(WorkerInfo(other, "decode", backend.addresses[other], num_blocks=64,
                                             block_size=16), None)])

        task = asyncio.create_task(drop())
        got = [t async for x in d.stream(d.route(PROMPT), "req", SamplingParams(max_tokens=N_TOKENS), None)
               for t in x.token_ids]
        await task
        return got

    assert asyncio.run(asyncio.wait_for(run(), 20)) == [token_at(len(PROMPT), k) for k in range(N_TOKENS)]
    assert backend.requests[0].request_id in backend.closed  # the silent stream was closed



def test_metrics_show_migrations_restarts_and_pool_integrity() -> None:
    d, backend, view = _dispatcher({"decode-a": "h:1", "decode-b": "h:2"})
    first_pick = d.route(PROMPT).decision
    assert first_pick is not None
    backend.die_after = {first_pick.decode_worker_id: 2}
    asyncio.run(_collect(d, SamplingParams(max_tokens=N_TOKENS)))
    broken = LoadSnapshot(free_blocks=60, total_blocks=64, integrity_ok=False)
    view.update_workers([(WorkerInfo("decode-a", "decode", "h:1", num_blocks=64, block_size=16), broken),
                         (WorkerInfo("decode-b", "decode", "h:2", num_blocks=64, block_size=16), None)])
    d.metrics.worker_restarts.labels("decode-a").inc()
    text = d.metrics.render()[0].decode()
    assert 'splitserve_migrations_total{outcome="attempted"} 1.0' in text
    assert 'splitserve_migrations_total{outcome="succeeded"} 1.0' in text
    assert 'splitserve_migrations_total{outcome="failed"} 0.0' in text
    assert 'splitserve_worker_restarts_total{process="decode-a"} 1.0' in text
    assert 'splitserve_worker_kv_pool_integrity_ok{pool="decode",worker="decode-a"} 0.0' in text
    assert 'splitserve_worker_kv_pool_integrity_ok{pool="decode",worker="decode-b"} 1.0' in text


def test_migration_settings_are_validated_with_their_names() -> None:
    from cluster.config import ConfigError, config_from_dict, load_config
    from router.settings import RouterSettings, RouterSettingsError

    with pytest.raises(RouterSettingsError, match="max_migrations"):
        RouterSettings(max_migrations=-1)
    with pytest.raises(RouterSettingsError, match="migration_wait_s"):
        RouterSettings(migration_wait_s=float("nan"))
    base = load_config(None).to_dict()
    assert load_config(None).router.max_migrations == 3 and load_config(None).router.migration_wait_s == 120
    with pytest.raises(ConfigError, match=r"router\.migration_wait_s"):
        config_from_dict({**base, "router": {**base["router"], "migration_wait_s": -1}})
