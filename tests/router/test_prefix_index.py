"""PrefixIndex: exact longest-prefix matches from KV events, per worker and for all at once."""

from __future__ import annotations

from engine.block_hash import prompt_block_hashes
from protocol.registry import KVEvent
from router.prefix_index import PrefixIndex

BS = 16


def _hashes(tokens: list[int]) -> list[int]:
    return prompt_block_hashes(tokens, BS)


def test_longest_prefix_from_events() -> None:
    idx = PrefixIndex()
    a = _hashes(list(range(64)))  # 4 blocks
    idx.apply("w0", [KVEvent("stored", tuple(a[:3]))])
    idx.check_integrity()
    assert idx.overlap_blocks("w0", a) == 3
    assert idx.overlap_blocks("w1", a) == 0
    # a prompt that diverges in block 1 matches only block 0 (hashes are chained)
    b = _hashes(list(range(16)) + [999] * 48)
    assert b[0] == a[0] and b[1] != a[1]
    assert idx.overlap_blocks("w0", b) == 1
    # a hole in the middle stops the match: block 2 alone is useless without block 1
    idx.apply("w0", [KVEvent("removed", (a[1],))])
    idx.check_integrity()
    assert idx.overlap_blocks("w0", a) == 1
    assert idx.overlap_blocks("w0", []) == 0


def test_overlaps_all_workers_in_one_pass() -> None:
    idx = PrefixIndex()
    h = _hashes(list(range(80)))  # 5 blocks
    idx.apply("a", [KVEvent("stored", tuple(h[:5]))])
    idx.apply("b", [KVEvent("stored", tuple(h[:2]))])
    idx.apply("c", [KVEvent("stored", (h[1], h[2]))])  # no root block: no usable prefix
    assert idx.overlaps(h) == {"a": 5, "b": 2}
    assert idx.overlaps(h[:1]) == {"a": 1, "b": 1}
    for w in ("a", "b", "c"):
        assert idx.overlap_blocks(w, h) == idx.overlaps(h).get(w, 0)
    assert idx.overlaps(_hashes([7] * 32)) == {}


def test_events_apply_in_order_and_idempotently() -> None:
    idx = PrefixIndex()
    h = _hashes(list(range(32)))
    idx.apply("w", [KVEvent("stored", tuple(h)), KVEvent("removed", (h[1],)), KVEvent("stored", (h[1],))])
    assert idx.overlap_blocks("w", h) == 2
    idx.apply("w", [KVEvent("stored", tuple(h))])  # duplicates are harmless
    idx.apply("w", [KVEvent("removed", (12345,))])  # removing what was never stored too
    idx.apply("ghost", [KVEvent("removed", (h[0],))])
    idx.check_integrity()
    assert idx.num_blocks("w") == 2 and len(idx) == 2


def test_cleared_and_remove_worker() -> None:
    idx = PrefixIndex()
    h = _hashes(list(range(48)))
    idx.apply("a", [KVEvent("stored", tuple(h))])
    idx.apply("b", [KVEvent("stored", tuple(h[:1]))])
    idx.apply("a", [KVEvent("cleared")])
    assert idx.overlaps(h) == {"b": 1} and idx.workers() == ["b"]
    idx.remove_worker("b")
    idx.remove_worker("never-seen")
    idx.check_integrity()
    assert len(idx) == 0 and idx.workers() == []
