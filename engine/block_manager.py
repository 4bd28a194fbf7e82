"""`BlockManager`: which KV blocks each sequence owns, and the prefix cache over them.

Blocks are indices ``0..num_blocks-1`` into the `KVCachePool` tensors; this class never touches
a tensor. Every block is in exactly one of three states:

* **in use**: ``ref_count > 0``; held by that many block tables (prefix sharing, ``fork``);
* **cached free**: ``ref_count == 0`` but its content is still addressable by hash; it sits in
  the LRU and is reused either by a prefix hit (leaves the LRU) or, when the free list is
  empty, as a fresh block (evicted oldest-first, a ``removed`` event is emitted);
* **free**: ``ref_count == 0``, no hash, in the free list.

Ordering (tests assert exact ids, so it is part of the contract):

* The free list is FIFO. It starts as ``0, 1, ..., num_blocks-1``; freed blocks join at the tail.
  Fresh allocations take from the free list first and only then evict from the LRU, so a
  cached prefix survives as long as never-hashed blocks remain.
* ``free`` releases a table tail-first: the last block of a sequence reaches the free list / LRU
  before its first block, so under memory pressure the tail of a cached prefix is evicted
  before its head (a chained hash is useless without its parents).
* The blocks one allocation takes (chosen by the two rules above) enter the table in ascending
  id order. Tail-first release hands blocks back in descending runs; placed as taken, a
  recycled sequence would pair block for block with a fresh one on its KV transfer peer in
  opposite directions, and every block would become its own copy (8192 for a 4K-token prompt
  of Llama-3.1-8B instead of 32). Ascending on both sides, the runs coalesce.

A block's hash is registered only by ``commit``, i.e. once its KV is computed (or has landed
from a prefill worker); a prefix hit can therefore never point at a block still being written.
If two sequences compute the same block independently, the first to commit owns the hash; the
second block stays unhashed and returns to the free list when released.

Events: ``KVEvent("stored", hashes, parent_hash)`` per run of newly registered blocks (in chain
order; ``parent_hash`` is the hash before the run, ``None`` at a sequence's first block),
``KVEvent("removed", hashes)`` per allocation that evicted cached blocks, and
``KVEvent("cleared")`` on ``reset_prefix_cache``. The kinds match `protocol.registry.KVEvent`.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from engine.block_hash import hash_block, iter_block_hashes
from engine.errors import OutOfBlocksError

SeqId = Hashable
KVEventKind = Literal["stored", "removed", "cleared"]


class BlockIntegrityError(AssertionError):
    """The manager's bookkeeping disagrees with itself (a bug, never a user error)."""


@dataclass(frozen=True)
class KVEvent:
    """One change to the prefix cache, in order; the router's prefix index replays these."""

    kind: KVEventKind
    block_hashes: tuple[int, ...] = ()
    parent_hash: int | None = None  # "stored" only: hash of the block before the first one


@dataclass
class _SeqBlocks:
    table: list[int]
    num_slots: int  # slots the owner asked for; len(table) == ceil(num_slots / block_size)
    # chained hashes of the leading full blocks whose KV is known computed (prefix hits and
    # committed blocks); the next commit continues the chain from the last one
    hashes: list[int] = field(default_factory=list)


class BlockManager:
    """Allocator of KV blocks with ref counts, chained prefix hashes and an LRU of cached blocks.

    Data structures are chosen so that every operation is O(blocks touched):

    * free list: a ``deque`` -- blocks only leave at the head and join at the tail;
    * LRU of cached-free blocks: an ``OrderedDict`` (a hash map over a doubly-linked list), since
      a prefix hit removes a block from the *middle* in O(1) and eviction pops the oldest;
    * ``hash -> block`` dict for lookups, per-block ``ref_count`` / ``block_hash`` arrays.
    """

    def __init__(
        self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True, watermark: float = 0.01
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark: must be in [0, 1), got {watermark}")
        self.num_total_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.watermark = watermark
        # blocks kept free by new admissions so running sequences can still grow
        self.watermark_blocks = int(watermark * num_blocks)
        self._ref_count = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[int, int] = {}
        self._seqs: dict[SeqId, _SeqBlocks] = {}
        self._events: list[KVEvent] = []
        # prefix-cache effectiveness, in prompt tokens over all allocate() calls
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    # ---- sizes --------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks a fresh allocation can take: free plus cached-free (evictable)."""
        return len(self._free) + len(self._lru)

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._lru)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def __contains__(self, seq_id: SeqId) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id: SeqId) -> list[int]:
        return list(self._get(seq_id).table)

    def num_committed_blocks(self, seq_id: SeqId) -> int:
        """Leading blocks whose hash is known (0 without prefix caching): `commit` starts after them."""
        return len(self._get(seq_id).hashes)

    def block_table_view(self, seq_id: SeqId) -> Sequence[int]:
        """The live table, not a copy (a step reads it; copying every table every step costs
        host time that grows with the context). Read-only for the caller."""
        return self._get(seq_id).table

    # ---- prefix lookup ------------------------------------------------------------------------

    def _match(self, token_ids: Sequence[int], num_tokens: int) -> tuple[list[int], list[int]]:
        """Leading cached blocks of ``token_ids`` and their hashes.

        At most ``min(len(token_ids), num_tokens) - 1`` tokens, rounded down to a block, can hit:
        the model must compute at least one token to produce logits, and a table of
        ``num_tokens`` slots cannot hold more.
        """
        if not self.enable_prefix_caching:
            return [], []
        max_blocks = (min(len(token_ids), num_tokens) - 1) // self.block_size
        blocks: list[int] = []
        hashes: list[int] = []
        if max_blocks <= 0:
            return blocks, hashes
        for h in iter_block_hashes(token_ids[: max_blocks * self.block_size], self.block_size):
            b = self._hash_to_block.get(h)
            if b is None:
                break
            blocks.append(b)
            hashes.append(h)
        return blocks, hashes

    def num_cached_tokens(self, token_ids: Sequence[int]) -> int:
        """Tokens ``allocate(token_ids)`` would find cached now (full blocks, in use or cached free)."""
        return len(self._match(token_ids, len(token_ids))[0]) * self.block_size

    def _cost(self, num_tokens: int, hits: list[int]) -> int:
        """Free blocks an allocation consumes: new blocks plus hits taken out of the LRU."""
        revived = sum(1 for b in hits if self._ref_count[b] == 0)
        return self.num_blocks_for(num_tokens) - len(hits) + revived

    def can_allocate(self, num_tokens: int, token_ids: Sequence[int] | None = None) -> bool:
        """Whether a new sequence of ``num_tokens`` slots fits while leaving the watermark free."""
        hits = self._match(token_ids, num_tokens)[0] if token_ids is not None else []
        return self.num_free_blocks - self._cost(num_tokens, hits) >= self.watermark_blocks

    def can_ever_allocate(self, num_tokens: int) -> bool:
        """False when even an idle pool could not admit it: reject instead of queueing forever."""
        return self.num_blocks_for(num_tokens) <= self.num_total_blocks - self.watermark_blocks

    # ---- allocation ---------------------------------------------------------------------------

    def allocate(self, seq_id: SeqId, token_ids: Sequence[int], num_tokens: int | None = None) -> int:
        """Create ``seq_id``'s table with ``num_tokens`` slots; returns the tokens already cached.

        Prefix hits are shared (ref + 1); the rest are fresh blocks. Does not apply the
        watermark (``can_allocate`` does, as admission policy); raises `OutOfBlocksError`,
        with nothing changed, only when the blocks physically aren't there.
        """
        if seq_id in self._seqs:
            raise ValueError(f"seq_id: {seq_id!r} already has blocks")
        n = len(token_ids) if num_tokens is None else num_tokens
        if n < 1:
            raise ValueError(f"num_tokens: must be >= 1, got {n}")
        hits, hashes = self._match(token_ids, n)
        cost = self._cost(n, hits)
        if cost > self.num_free_blocks:
            raise OutOfBlocksError(
                f"need {cost} free KV blocks for {n} tokens, {self.num_free_blocks} free "
                f"of {self.num_total_blocks}"
            )
        for b in hits:
            if self._ref_count[b] == 0:
                del self._lru[b]
            self._ref_count[b] += 1
        table = hits + self._take_fresh(self.num_blocks_for(n) - len(hits))
        self._seqs[seq_id] = _SeqBlocks(table, n, hashes)
        cached = len(hits) * self.block_size
        if self.enable_prefix_caching:
            self.num_queried_tokens += len(token_ids)
            self.num_hit_tokens += cached
        return cached

    def append_slots(self, seq_id: SeqId, num_total_tokens: int) -> bool:
        """Grow the table to ``num_total_tokens`` slots; False (nothing changed) when out of
        blocks, so the caller preempts. May dip into the watermark: that is what it is for."""
        s = self._get(seq_id)
        need = self.num_blocks_for(num_total_tokens) - len(s.table)
        if need > self.num_free_blocks:
            return False
        if need > 0:
            s.table.extend(self._take_fresh(need))
        s.num_slots = max(s.num_slots, num_total_tokens)
        return True

    def fork(self, parent_id: SeqId, child_id: SeqId) -> list[tuple[int, int]]:
        """Give ``child_id`` the parent's KV: full blocks shared, the partial last block copied.

        Returns ``(src, dst)`` block pairs the caller must copy in the KV tensor before either
        sequence writes. Call it when the parent's slots are all computed (after a step):
        shared blocks must be full, because both sequences write their next tokens.
        """
        if child_id in self._seqs:
            raise ValueError(f"seq_id: {child_id!r} already has blocks")
        p = self._get(parent_id)
        full, partial = divmod(p.num_slots, self.block_size)
        if partial and self.num_free_blocks < 1:
            raise OutOfBlocksError("fork: no free KV block for the copy of the partial last block")
        table = p.table[:full]
        for b in table:
            self._ref_count[b] += 1
        pairs: list[tuple[int, int]] = []
        if partial:
            dst = self._take_fresh(1)[0]
            pairs.append((p.table[full], dst))
            table.append(dst)
        self._seqs[child_id] = _SeqBlocks(table, p.num_slots, p.hashes[:full])
        return pairs

    def commit(self, seq_id: SeqId, token_ids: Sequence[int], offset: int = 0) -> None:
        """Record that the KV of ``token_ids`` (all of the sequence's computed tokens, or those
        from ``offset`` on: a multiple of the block size within the already committed blocks) is
        written: newly full blocks get their hash and become prefix-cache hits for later sequences."""
        s = self._get(seq_id)
        total = offset + len(token_ids)
        if total > s.num_slots:
            raise ValueError(f"commit: {total} tokens but {seq_id!r} has only {s.num_slots} slots")
        if offset % self.block_size or offset > len(s.hashes) * self.block_size:
            raise ValueError(f"commit: offset {offset} is not a committed block boundary of {seq_id!r}")
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        run: list[int] = []
        run_parent: int | None = None
        for i in range(len(s.hashes), total // bs):
            parent = s.hashes[-1] if s.hashes else None
            h = hash_block(parent, token_ids[i * bs - offset : (i + 1) * bs - offset])
            s.hashes.append(h)
            b = s.table[i]
            if self._block_hash[b] is None and h not in self._hash_to_block:
                self._block_hash[b] = h
                self._hash_to_block[h] = b
                if not run:
                    run_parent = parent
                run.append(h)
            else:  # already registered (shared block) or computed twice: nothing new to announce
                self._flush_stored(run, run_parent)
                run = []
        self._flush_stored(run, run_parent)

    def _flush_stored(self, run: list[int], parent: int | None) -> None:
        if run:
            self._events.append(KVEvent("stored", tuple(run), parent))

    def free(self, seq_id: SeqId) -> None:
        """Release a sequence's blocks, tail first (see the module docstring for why)."""
        s = self._seqs.pop(seq_id, None)
        if s is None:
            raise KeyError(f"free: seq_id {seq_id!r} has no blocks (never allocated or already freed)")
        for b in reversed(s.table):
            self._ref_count[b] -= 1
            if self._ref_count[b] == 0:
                if self._block_hash[b] is not None:
                    self._lru[b] = None
                else:
                    self._free.append(b)

    def _take_fresh(self, n: int) -> list[int]:
        """Pop ``n`` blocks for new content: free list first, then evict the oldest cached."""
        out: list[int] = []
        evicted: list[int] = []
        while len(out) < n:
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._lru.popitem(last=False)
                h = self._block_hash[b]
                assert h is not None  # only hashed blocks enter the LRU
                del self._hash_to_block[h]
                self._block_hash[b] = None
                evicted.append(h)
            self._ref_count[b] = 1
            out.append(b)
        if evicted:
            self._events.append(KVEvent("removed", tuple(evicted)))
        out.sort()
        return out

    def _get(self, seq_id: SeqId) -> _SeqBlocks:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"seq_id {seq_id!r} has no blocks (never allocated or already freed)") from None

    # ---- prefix cache maintenance -------------------------------------------------------------

    def drain_events(self) -> list[KVEvent]:
        """Events since the last drain, oldest first."""
        events, self._events = self._events, []
        return events

    def reset_prefix_cache(self) -> None:
        """Forget every hash (e.g. after weights change). Blocks in use keep their content and
        owners but are no longer shareable; cached-free blocks become plain free blocks."""
        if not self.enable_prefix_caching:
            return
        self._free.extend(self._lru)
        self._lru.clear()
        for b in self._hash_to_block.values():
            self._block_hash[b] = None
        self._hash_to_block.clear()
        self._events.append(KVEvent("cleared"))

    def check_integrity(self) -> None:
        """Cross-check every structure; raises `BlockIntegrityError` on the first disagreement."""

        def fail(msg: str) -> None:
            raise BlockIntegrityError(f"BlockManager: {msg}")

        held: Counter[int] = Counter()
        for sid, s in self._seqs.items():
            if len(set(s.table)) != len(s.table):
                fail(f"seq {sid!r} holds a block twice: {s.table}")
            if len(s.table) != self.num_blocks_for(s.num_slots):
                fail(f"seq {sid!r}: {len(s.table)} blocks for {s.num_slots} slots")
            if len(s.hashes) > s.num_slots // self.block_size:
                fail(f"seq {sid!r}: {len(s.hashes)} hashed blocks exceed its full blocks")
            held.update(s.table)
        free, lru = set(self._free), set(self._lru)
        if len(free) != len(self._free):
            fail("a block is in the free list twice")
        if free & lru:
            fail(f"blocks both free and cached: {sorted(free & lru)}")
        for b in range(self.num_total_blocks):
            ref, h = self._ref_count[b], self._block_hash[b]
            if ref != held[b]:
                fail(f"block {b}: ref_count {ref} but held by {held[b]} tables")
            if ref > 0 and (b in free or b in lru):
                fail(f"block {b} is in use and also free/cached")
            if ref == 0 and (b in free) == (b in lru):
                fail(f"block {b} is unreferenced but in {'both' if b in free else 'neither'} free list/LRU")
            if b in free and h is not None:
                fail(f"free block {b} still has a hash")
            if b in lru and h is None:
                fail(f"cached block {b} has no hash")
            if h is not None and self._hash_to_block.get(h) != b:
                fail(f"block {b}'s hash does not map back to it")
        if sum(h is not None for h in self._block_hash) != len(self._hash_to_block):
            fail("hash map and block hashes disagree in size")
        if not self.enable_prefix_caching and (self._hash_to_block or lru):
            fail("prefix caching is off but blocks are hashed")
