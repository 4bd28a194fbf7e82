"""BlockManager: exact ids and eviction order on tiny pools, then random operation sequences
checked against a simulated KV tensor (every hit must really hold the prompt's tokens)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.block_hash import hash_block, prompt_block_hashes
from engine.block_manager import BlockIntegrityError, BlockManager, KVEvent
from engine.errors import OutOfBlocksError

# ---- hashing --------------------------------------------------------------------------------


def test_hash_is_stable_across_processes_and_versions() -> None:
    # pinned values: the router and every worker must agree, so a change here is a protocol change
    h1 = hash_block(None, [1, 2, 3])
    assert h1 == 15456144423356324754
    assert hash_block(h1, [4, 5, 6]) == 15246391157918642316
    assert 0 <= h1 < 2**64


def test_hash_is_chained_and_root_is_distinct() -> None:
    assert hash_block(None, [7, 8]) != hash_block(0, [7, 8])
    assert hash_block(1, [7, 8]) != hash_block(2, [7, 8])
    a = prompt_block_hashes([1, 2, 3, 4, 5, 6, 7], 2)
    b = prompt_block_hashes([9, 2, 3, 4, 5, 6], 2)
    assert len(a) == 3 and len(b) == 3  # only full blocks are hashed
    assert all(x != y for x, y in zip(a, b))  # a different first block changes every later hash
    assert a[1] == hash_block(a[0], [3, 4])


def test_hash_rejects_ids_outside_int32() -> None:
    with pytest.raises(ValueError, match="int32"):
        hash_block(None, [2**31])


# ---- exact ids and order --------------------------------------------------------------------


def test_fresh_blocks_are_fifo_from_lowest_ids() -> None:
    bm = BlockManager(8, 4, watermark=0)
    assert bm.allocate("a", list(range(10))) == 0
    assert bm.block_table("a") == [0, 1, 2]
    bm.allocate("b", list(range(100, 105)))
    assert bm.block_table("b") == [3, 4]
    bm.free("a")  # tail first: 2, 1, 0 join the free list after 5, 6, 7
    bm.allocate("c", list(range(200, 216)))
    assert bm.block_table("c") == [2, 5, 6, 7]  # takes 5, 6, 7, 2; placed in ascending order
    assert bm.num_free_blocks == 2
    bm.check_integrity()


def test_recycled_blocks_form_ascending_runs() -> None:
    """What a KV transfer needs: a sequence that reuses a freed one's blocks gets them as one
    ascending run (freed tail first, they come back descending), so it pairs with a fresh
    run on the peer as one descriptor per layer, not one per block."""
    bm = BlockManager(30, 4, watermark=0, enable_prefix_caching=False)
    bm.allocate("a", list(range(40)))  # blocks 0..9
    bm.allocate("b", list(range(80)))  # blocks 10..29: the pool is full
    bm.free("b")  # back as 29, 28, ..., 10
    bm.allocate("c", list(range(48)))
    assert bm.block_table("c") == list(range(18, 30))
    bm.free("a")
    bm.allocate("d", list(range(64)))  # b's 10..17, then a's 9..2
    assert bm.block_table("d") == list(range(2, 18))
    bm.check_integrity()


def test_prefix_hits_are_full_blocks_and_leave_one_token_to_compute() -> None:
    bm = BlockManager(16, 4, watermark=0)
    prompt = list(range(12))
    bm.allocate("a", prompt)
    bm.commit("a", prompt)  # three full blocks hashed
    assert bm.num_cached_tokens(prompt) == 8  # 11 tokens at most -> 2 blocks
    assert bm.num_cached_tokens([*prompt, 99]) == 12
    assert bm.num_cached_tokens(prompt[:7]) == 4  # the partial second block never hits
    assert bm.num_cached_tokens([0, 1, 2, 99, *prompt[4:]]) == 0  # chain breaks at block 0
    assert bm.allocate("b", prompt) == 8
    ta, tb = bm.block_table("a"), bm.block_table("b")
    assert tb[:2] == ta[:2] and tb[2] not in ta
    assert bm.allocate("c", [*prompt, 99]) == 12
    assert bm.block_table("c")[:3] == ta
    bm.check_integrity()


def test_num_tokens_below_prompt_limits_hits_to_the_table() -> None:
    bm = BlockManager(16, 4, watermark=0)
    prompt = list(range(16))
    bm.allocate("a", prompt)
    bm.commit("a", prompt)
    assert bm.allocate("b", prompt, num_tokens=8) == 4  # 8 slots: one hit, one block to compute
    assert len(bm.block_table("b")) == 2
    assert bm.allocate("c", prompt, num_tokens=20) == 12
    assert len(bm.block_table("c")) == 5


def test_cached_free_blocks_are_reused_and_leave_the_lru() -> None:
    bm = BlockManager(8, 4, watermark=0)
    prompt = list(range(9))
    bm.allocate("a", prompt)
    bm.commit("a", prompt)
    table = bm.block_table("a")
    bm.free("a")
    assert bm.num_free_blocks == 8 and bm.num_cached_free_blocks == 2
    assert bm.allocate("b", prompt) == 8
    assert bm.block_table("b")[:2] == table[:2]
    assert bm.num_cached_free_blocks == 0
    assert bm.num_free_blocks == 8 - 3
    bm.check_integrity()


def test_lru_evicts_oldest_and_a_tables_tail_first() -> None:
    bm = BlockManager(4, 2, watermark=0)
    a = [1, 2, 3, 4, 5]
    bm.allocate("a", a)
    bm.commit("a", a)
    h0, h1 = prompt_block_hashes(a, 2)
    assert bm.drain_events() == [KVEvent("stored", (h0, h1), None)]
    assert bm.block_table("a") == [0, 1, 2]
    bm.free("a")  # block 2 (unhashed) -> free list; 1 then 0 -> LRU
    bm.allocate("b", [9] * 8)
    assert bm.block_table("b") == [0, 1, 2, 3]
    assert bm.drain_events() == [KVEvent("removed", (h1, h0))]  # free list first, then LRU oldest-first
    bm.free("b")
    assert bm.num_free_blocks == 4 and bm.num_cached_free_blocks == 0


def test_lru_order_follows_release_and_hits_refresh() -> None:
    bm = BlockManager(4, 2, watermark=0)
    x, y = [1, 1, 1], [2, 2, 2]
    for sid, toks in (("x", x), ("y", y)):
        bm.allocate(sid, toks)
        bm.commit(sid, toks)
    assert (bm.block_table("x"), bm.block_table("y")) == ([0, 1], [2, 3])
    bm.free("x")
    bm.free("y")  # LRU: 0, 2 (the unhashed tails 1, 3 are plain free)
    bm.allocate("x2", x)  # hit on 0 takes it out of the LRU; fresh block 1
    assert bm.block_table("x2") == [0, 1]
    bm.free("x2")  # LRU now: 2, 0 -- block 0 was used more recently
    bm.allocate("z", [5] * 6)
    assert bm.block_table("z") == [1, 2, 3]  # free 1, 3, then the LRU's oldest: 2 (not 0)
    assert bm.drain_events()[-1] == KVEvent("removed", tuple(prompt_block_hashes(y, 2)))
    assert bm.num_cached_tokens(x) == 2 and bm.num_cached_tokens(y) == 0


def test_num_cached_tokens_is_read_only() -> None:
    bm = BlockManager(4, 2, watermark=0)
    bm.allocate("a", [1, 1, 1])
    bm.commit("a", [1, 1, 1])
    bm.free("a")
    before = (bm.num_free_blocks, bm.num_cached_free_blocks)
    assert bm.num_cached_tokens([1, 1, 1]) == 2
    assert bm.can_allocate(3, [1, 1, 1])
    assert (bm.num_free_blocks, bm.num_cached_free_blocks) == before
    bm.check_integrity()


def test_fork_shares_full_blocks_and_copies_the_partial_one() -> None:
    bm = BlockManager(8, 4, watermark=0)
    bm.allocate("p", list(range(10)))
    assert bm.fork("p", "c") == [(2, 3)]
    assert bm.block_table("c") == [0, 1, 3]
    bm.allocate("q", list(range(8)))
    assert bm.fork("q", "d") == []  # no partial block, nothing to copy
    assert bm.block_table("d") == bm.block_table("q") == [4, 5]
    bm.check_integrity()
    for sid in ("p", "c", "q", "d"):
        bm.free(sid)
    assert bm.num_free_blocks == 8
    bm.check_integrity()


def test_fork_out_of_blocks_changes_nothing() -> None:
    bm = BlockManager(3, 4, watermark=0)
    bm.allocate("p", list(range(10)))
    with pytest.raises(OutOfBlocksError):
        bm.fork("p", "c")
    assert "c" not in bm
    bm.check_integrity()


def test_watermark_reserves_blocks_for_growth() -> None:
    bm = BlockManager(100, 16, watermark=0.1)
    assert bm.watermark_blocks == 10
    assert bm.can_allocate(90 * 16) and not bm.can_allocate(90 * 16 + 1)
    assert bm.can_ever_allocate(90 * 16) and not bm.can_ever_allocate(91 * 16)
    bm.allocate("a", [0] * (80 * 16))
    assert not bm.can_allocate(11 * 16)
    assert bm.append_slots("a", 100 * 16)  # running sequences may use the reserve
    assert bm.num_free_blocks == 0
    assert not bm.append_slots("a", 100 * 16 + 1)
    assert len(bm.block_table("a")) == 100
    bm.check_integrity()


def test_can_allocate_counts_prefix_hits() -> None:
    bm = BlockManager(6, 2, watermark=0)
    prompt = [1, 2, 3, 4, 5, 6, 7]
    bm.allocate("a", prompt)
    bm.commit("a", prompt)
    bm.allocate("filler", [0, 0])  # 4 + 1 in use, 1 free
    assert not bm.can_allocate(len(prompt))
    assert bm.can_allocate(len(prompt), prompt)  # 3 of 4 blocks are hits on a's blocks
    assert bm.allocate("b", prompt) == 6
    assert bm.num_free_blocks == 0


def test_allocate_out_of_blocks_changes_nothing() -> None:
    bm = BlockManager(4, 4, watermark=0)
    bm.allocate("a", list(range(9)))
    with pytest.raises(OutOfBlocksError):
        bm.allocate("b", list(range(9)))
    assert "b" not in bm and bm.num_free_blocks == 1
    assert not bm.append_slots("a", 20)
    assert bm.block_table("a") == [0, 1, 2]
    bm.check_integrity()


def test_free_unknown_and_double_free_raise_without_corruption() -> None:
    bm = BlockManager(4, 4)
    with pytest.raises(KeyError, match="nope"):
        bm.free("nope")
    bm.allocate("a", [1, 2, 3])
    bm.free("a")
    with pytest.raises(KeyError, match="already freed"):
        bm.free("a")
    bm.check_integrity()
    assert bm.num_free_blocks == 4
    bm.allocate("b", [1])
    with pytest.raises(ValueError, match="already has blocks"):
        bm.allocate("b", [1])


def test_prefix_caching_disabled_hashes_nothing() -> None:
    bm = BlockManager(4, 2, enable_prefix_caching=False, watermark=0)
    bm.allocate("a", [1, 2, 3, 4, 5])
    bm.commit("a", [1, 2, 3, 4, 5])
    bm.free("a")
    assert bm.num_cached_free_blocks == 0 and bm.drain_events() == []
    assert bm.allocate("b", [1, 2, 3, 4, 5]) == 0
    assert bm.num_cached_tokens([1, 2, 3, 4, 5]) == 0
    bm.check_integrity()


def test_duplicate_computation_keeps_the_first_owner() -> None:
    bm = BlockManager(8, 2, watermark=0)
    p = [1, 2, 3, 4, 5]
    bm.allocate("a", p)
    bm.allocate("b", p)  # nothing committed yet: no hits, separate blocks
    bm.commit("a", p)
    bm.commit("b", p)  # same hashes already owned by a's blocks: no new registration
    assert [e.kind for e in bm.drain_events()] == ["stored"]
    bm.free("b")
    assert bm.num_cached_free_blocks == 0  # b's duplicate blocks went to the free list
    bm.check_integrity()


def test_commit_continues_the_chain_and_reports_parents() -> None:
    bm = BlockManager(8, 2, watermark=0)
    toks = [1, 2, 3, 4, 5, 6, 7]
    h = prompt_block_hashes(toks, 2)
    bm.allocate("a", toks[:3], num_tokens=3)
    bm.commit("a", toks[:3])
    assert bm.append_slots("a", 7)
    bm.commit("a", toks[:5])
    bm.commit("a", toks)
    assert bm.drain_events() == [
        KVEvent("stored", (h[0],), None),
        KVEvent("stored", (h[1],), h[0]),
        KVEvent("stored", (h[2],), h[1]),
    ]
    with pytest.raises(ValueError, match="slots"):
        bm.commit("a", [*toks, 8])


def test_reset_prefix_cache_forgets_hashes() -> None:
    bm = BlockManager(4, 2, watermark=0)
    bm.allocate("a", [1, 2, 3])
    bm.commit("a", [1, 2, 3])
    bm.allocate("b", [4, 5, 6])
    bm.commit("b", [4, 5, 6])
    bm.free("a")
    bm.drain_events()
    bm.reset_prefix_cache()
    assert bm.drain_events() == [KVEvent("cleared")]
    assert bm.num_cached_free_blocks == 0 and bm.num_free_blocks == 2
    assert bm.num_cached_tokens([1, 2, 3]) == 0 and bm.num_cached_tokens([4, 5, 6]) == 0
    bm.check_integrity()
    bm.free("b")
    assert bm.num_free_blocks == 4 and bm.num_cached_free_blocks == 0


def test_check_integrity_catches_corruption() -> None:
    bm = BlockManager(4, 2)
    bm.allocate("a", [1, 2, 3])
    bm._ref_count[0] += 1
    with pytest.raises(BlockIntegrityError, match="ref_count"):
        bm.check_integrity()


# ---- random operation sequences -------------------------------------------------------------

BS = 2
NUM_BLOCKS = 8
# prompts share a few prefixes (system-prompt style) so prefix hits and evictions are common
_PREFIXES = ([], [1, 1, 1, 1], [1, 1, 1, 1, 2, 2], [2, 0, 2, 0, 2])
tokens = st.builds(
    lambda prefix, rest: prefix + rest, st.sampled_from(_PREFIXES), st.lists(st.integers(0, 2), max_size=4)
).filter(bool)


class BlockManagerMachine(RuleBasedStateMachine):
    """Drives the manager like a scheduler would and keeps a fake KV tensor: each slot holds the
    token written there. Every computed position of every sequence must read back its token,
    which fails if a block is shared wrongly, reused while cached, or hit with stale content."""

    caching = True

    @initialize()
    def setup(self) -> None:
        self.bm = BlockManager(NUM_BLOCKS, BS, enable_prefix_caching=self.caching, watermark=0.1)
        self.kv: dict[int, list[int | None]] = {b: [None] * BS for b in range(NUM_BLOCKS)}
        self.seqs: dict[int, list[int]] = {}  # id -> all tokens (slots == len)
        self.computed: dict[int, int] = {}
        self.next_id = 0

    def _write(self, sid: int, start: int) -> None:
        """Compute tokens [start, len): write their KV, then commit."""
        table = self.bm.block_table(sid)
        others = {b for o, _ in self.seqs.items() if o != sid for b in self.bm.block_table(o)}
        for pos in range(start, len(self.seqs[sid])):
            b = table[pos // BS]
            assert b not in others, f"seq {sid} writes block {b} shared with another sequence"
            self.kv[b][pos % BS] = self.seqs[sid][pos]
        self.computed[sid] = len(self.seqs[sid])
        self.bm.commit(sid, self.seqs[sid])

    @rule(prompt=tokens, compute=st.booleans())
    def allocate(self, prompt: list[int], compute: bool) -> None:
        sid, self.next_id = self.next_id, self.next_id + 1
        free_before = self.bm.num_free_blocks
        try:
            cached = self.bm.allocate(sid, prompt)
        except OutOfBlocksError:
            assert self.bm.num_free_blocks == free_before and sid not in self.bm
            return
        assert cached % BS == 0 and cached <= len(prompt) - 1
        assert cached == 0 or self.caching
        table = self.bm.block_table(sid)
        for pos in range(cached):  # a hit must really hold the prompt's KV
            assert self.kv[table[pos // BS]][pos % BS] == prompt[pos]
        self.seqs[sid] = list(prompt)
        self.computed[sid] = cached
        if compute:
            self._write(sid, cached)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def compute(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self._write(sid, self.computed[sid])

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), new=st.lists(st.integers(0, 2), min_size=1, max_size=4))
    def append(self, data: st.DataObject, new: list[int]) -> None:
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        if self.computed[sid] < len(self.seqs[sid]):
            self._write(sid, self.computed[sid])  # a sequence grows only after its step ran
        before = self.bm.block_table(sid)
        if self.bm.append_slots(sid, len(self.seqs[sid]) + len(new)):
            self.seqs[sid].extend(new)
            assert self.bm.block_table(sid)[: len(before)] == before
        else:
            assert self.bm.block_table(sid) == before

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from(sorted(self.seqs)))
        self._write(parent, self.computed[parent])  # fork after the parent's step
        child, self.next_id = self.next_id, self.next_id + 1
        try:
            pairs = self.bm.fork(parent, child)
        except OutOfBlocksError:
            assert child not in self.bm
            return
        for src, dst in pairs:
            self.kv[dst] = list(self.kv[src])
        self.seqs[child] = list(self.seqs[parent])
        self.computed[child] = self.computed[parent]

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.bm.free(sid)
        del self.seqs[sid], self.computed[sid]

    @rule()
    def reset(self) -> None:
        self.bm.reset_prefix_cache()

    @rule()
    def drain(self) -> None:
        for ev in self.bm.drain_events():
            assert ev.kind in ("stored", "removed", "cleared")

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "bm"):
            return
        self.bm.check_integrity()
        held: dict[int, int] = {}
        for sid, toks in self.seqs.items():
            table = self.bm.block_table(sid)
            assert len(table) == -(-len(toks) // BS)
            for b in table:
                held[b] = held.get(b, 0) + 1
            for pos in range(self.computed[sid]):
                assert self.kv[table[pos // BS]][pos % BS] == toks[pos], f"seq {sid} lost KV at {pos}"
        assert all(self.bm._ref_count[b] == n for b, n in held.items())
        assert self.bm.num_free_blocks == NUM_BLOCKS - len(held)

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for sid in list(self.seqs):
            self.bm.free(sid)
        self.bm.check_integrity()
        assert self.bm.num_free_blocks == self.bm.num_total_blocks


class BlockManagerNoCachingMachine(BlockManagerMachine):
    caching = False


_fast = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow], "stateful_step_count": 40}
TestBlockManagerStateful = BlockManagerMachine.TestCase
TestBlockManagerStateful.settings = settings(max_examples=100, **_fast)
TestBlockManagerNoCachingStateful = BlockManagerNoCachingMachine.TestCase
TestBlockManagerNoCachingStateful.settings = settings(max_examples=20, **_fast)
