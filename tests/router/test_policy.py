"""Routing decisions on constructed loads: KV-aware choice, disaggregation, fallbacks."""

from __future__ import annotations

import pytest

from engine.block_hash import prompt_block_hashes
from protocol.registry import KVEvent, LoadSnapshot, WorkerInfo
from router.errors import NoWorkersError, QueueFullError
from router.policy import (
    POLICIES,
    ClusterSnapshot,
    KVAwarePolicy,
    PolicySettings,
    RoundRobinPolicy,
    WorkerState,
    make_policy,
)
from router.prefix_index import PrefixIndex

BS = 16
SETTINGS = PolicySettings(block_size=BS, disagg_threshold=64, prefill_queue_limit=4096, max_queued_requests=8)


def _w(
    wid: str, pool: str = "decode", *, queued: int = 0, qtok: int = 0, running: int = 0, free: int = 1000
) -> WorkerState:
    info = WorkerInfo(wid, pool, "h:1", num_blocks=1000, block_size=BS)  # type: ignore[arg-type]
    load = LoadSnapshot(queued, qtok, running, free_blocks=free, total_blocks=1000)
    return WorkerState(info, load)


def _cluster(
    decode: list[WorkerState], prefill: list[WorkerState], cached: dict[str, list[int]] | None = None
) -> ClusterSnapshot:
    idx = PrefixIndex()
    for wid, hashes in (cached or {}).items():
        idx.apply(wid, [KVEvent("stored", tuple(hashes))])
    return ClusterSnapshot(decode, prefill, idx)


PROMPT = list(range(1000, 1000 + 640))  # 40 blocks
HASHES = prompt_block_hashes(PROMPT, BS)


def test_registry() -> None:
    assert {"kv_aware", "round_robin"} <= set(POLICIES)
    assert isinstance(make_policy("kv_aware", SETTINGS), KVAwarePolicy)
    with pytest.raises(ValueError, match=r"router\.policy"):
        make_policy("nope", SETTINGS)


def test_short_prompt_stays_on_least_loaded_decode() -> None:
    p = KVAwarePolicy(SETTINGS)
    c = _cluster([_w("d0", running=6), _w("d1", running=1)], [_w("p0", "prefill")])
    d = p.route(40, prompt_block_hashes(list(range(40)), BS), c)
    assert (d.decode_worker_id, d.prefill_worker_id, d.reason) == ("d1", None, "short_prompt")


def test_long_uncached_prompt_is_disaggregated() -> None:
    p = KVAwarePolicy(SETTINGS)
    c = _cluster([_w("d0")], [_w("p0", "prefill", qtok=2000), _w("p1", "prefill", qtok=100)])
    d = p.route(len(PROMPT), HASHES, c)
    assert d.disaggregated and d.reason == "disaggregated"
    assert (d.decode_worker_id, d.prefill_worker_id) == ("d0", "p1")


def test_prefill_worker_chosen_by_cache_hit_minus_queue() -> None:
    p = KVAwarePolicy(SETTINGS)
    # p0 holds 30 of the 40 blocks: 480 tokens saved outweigh its 300 extra queued tokens
    c = _cluster(
        [_w("d0")], [_w("p0", "prefill", qtok=400), _w("p1", "prefill", qtok=100)], {"p0": HASHES[:30]}
    )
    d = p.route(len(PROMPT), HASHES, c)
    assert d.prefill_worker_id == "p0" and d.prefill_cached_tokens == 30 * BS
    # ...but not when its queue is longer than what the hit saves
    c = _cluster(
        [_w("d0")], [_w("p0", "prefill", qtok=900), _w("p1", "prefill", qtok=100)], {"p0": HASHES[:30]}
    )
    assert p.route(len(PROMPT), HASHES, c).prefill_worker_id == "p1"


def test_decode_cached_prompt_skips_prefill_pool() -> None:
    p = KVAwarePolicy(SETTINGS)
    # d1 holds 38 of 40 blocks: 32 tokens left, under the threshold of 64 -> prefill on d1
    c = _cluster([_w("d0"), _w("d1", running=3)], [_w("p0", "prefill")], {"d1": HASHES[:38]})
    d = p.route(len(PROMPT), HASHES, c)
    assert (d.decode_worker_id, d.prefill_worker_id, d.reason) == ("d1", None, "decode_cached")
    assert d.decode_cached_tokens == 38 * BS


def test_kv_aware_prefers_cached_decode_worker_at_equal_load() -> None:
    p = KVAwarePolicy(SETTINGS)
    c = _cluster([_w("d0"), _w("d1")], [_w("p0", "prefill")], {"d1": HASHES[:20]})
    d = p.route(len(PROMPT), HASHES, c)
    assert d.disaggregated and d.decode_worker_id == "d1" and d.decode_cached_tokens == 20 * BS


def test_cache_hit_loses_to_much_lighter_load() -> None:
    p = KVAwarePolicy(SETTINGS)
    c = _cluster([_w("d0"), _w("d1", running=7, qtok=3000, free=100)], [], {"d1": HASHES[:20]})
    d = p.route(len(PROMPT), HASHES, c)
    assert d.decode_worker_id == "d0" and d.reason == "no_prefill_pool"


def test_last_token_always_computed() -> None:
    p = KVAwarePolicy(SETTINGS)
    c = _cluster([_w("d0")], [], {"d0": HASHES})
    assert p.route(len(PROMPT), HASHES, c).decode_cached_tokens == len(PROMPT) - 1


def test_fallback_when_prefill_pool_empty_or_overloaded() -> None:
    p = KVAwarePolicy(SETTINGS)
    d = p.route(len(PROMPT), HASHES, _cluster([_w("d0")], []))
    assert d.prefill_worker_id is None and d.reason == "no_prefill_pool"
    busy = [_w("p0", "prefill", qtok=5000), _w("p1", "prefill", qtok=4097)]
    d = p.route(len(PROMPT), HASHES, _cluster([_w("d0")], busy))
    assert d.prefill_worker_id is None and d.reason == "prefill_overloaded"


def test_exclude_failed_workers() -> None:
    p = KVAwarePolicy(SETTINGS)
    c = _cluster([_w("d0"), _w("d1", running=5)], [_w("p0", "prefill"), _w("p1", "prefill", qtok=50)])
    d = p.route(len(PROMPT), HASHES, c, exclude=frozenset({"p0", "d0"}))
    assert (d.decode_worker_id, d.prefill_worker_id) == ("d1", "p1")
    d = p.route(len(PROMPT), HASHES, c, exclude=frozenset({"p0", "p1"}))
    assert d.prefill_worker_id is None and d.reason == "no_prefill_pool"


def test_no_workers_and_full_queues() -> None:
    p = KVAwarePolicy(SETTINGS)
    with pytest.raises(NoWorkersError):
        p.route(10, [], _cluster([], [_w("p0", "prefill")]))
    with pytest.raises(QueueFullError) as e:
        p.route(10, [], _cluster([_w("d0", queued=8), _w("d1", queued=9)], []))
    assert e.value.status_code == 429 and "Retry-After" in e.value.headers()
    # one worker with room is enough
    assert p.route(10, [], _cluster([_w("d0", queued=8), _w("d1", queued=7)], [])).decode_worker_id == "d1"


def test_round_robin_rotates_and_uses_threshold() -> None:
    p = RoundRobinPolicy(SETTINGS)
    c = _cluster([_w("d1"), _w("d0")], [_w("p0", "prefill"), _w("p1", "prefill")], {"d1": HASHES})
    picks = [p.route(len(PROMPT), HASHES, c) for _ in range(4)]
    assert [d.decode_worker_id for d in picks] == ["d0", "d1", "d0", "d1"]  # cache-blind
    assert [d.prefill_worker_id for d in picks] == ["p0", "p1", "p0", "p1"]
    assert p.route(10, [], c).prefill_worker_id is None
