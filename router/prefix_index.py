"""Which prompt prefixes each worker has in its KV cache, from the workers' own KV events.

The engine's block hashes are chained (each block's hash covers its parent's hash and its own
tokens), so a hash names a whole prefix: a set of hashes per worker *is* that worker's radix
tree, with the parent links folded into the hashes. The longest cached prefix of a prompt is
then its block hashes looked up in order until the first miss. Because the index is built
only from "stored"/"removed"/"cleared" events the workers publish, it is exact up to event
delivery lag, not an estimate from past routing decisions.

A reverse map (hash -> workers) lets `overlaps` score every worker in one pass over the
prompt, touching only the blocks some worker actually holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from protocol.registry import BlockHash, KVEvent


class PrefixIndex:
    """Per-worker sets of cached block hashes with a hash -> workers reverse map."""

    def __init__(self) -> None:
        self._by_worker: dict[str, set[BlockHash]] = {}
        self._by_hash: dict[BlockHash, set[str]] = {}

    def apply(self, worker_id: str, events: Iterable[KVEvent]) -> None:
        """Apply one worker's events in order (order matters: store, evict, store again)."""
        for ev in events:
            if ev.kind == "stored":
                held = self._by_worker.setdefault(worker_id, set())
                for h in ev.block_hashes:
                    if h not in held:
                        held.add(h)
                        self._by_hash.setdefault(h, set()).add(worker_id)
            elif ev.kind == "removed":
                held = self._by_worker.get(worker_id)
                if held is None:
                    continue
                for h in ev.block_hashes:
                    if h in held:
                        held.discard(h)
                        self._unlink(h, worker_id)
            elif ev.kind == "cleared":
                self.remove_worker(worker_id)

    def _unlink(self, h: BlockHash, worker_id: str) -> None:
        owners = self._by_hash.get(h)
        if owners is not None:
            owners.discard(worker_id)
            if not owners:
                del self._by_hash[h]

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker (it died or cleared its cache)."""
        for h in self._by_worker.pop(worker_id, ()):
            self._unlink(h, worker_id)

    def overlap_blocks(self, worker_id: str, hashes: Sequence[BlockHash]) -> int:
        """Number of leading blocks of ``hashes`` the worker holds (longest matching prefix)."""
        held = self._by_worker.get(worker_id)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def overlaps(self, hashes: Sequence[BlockHash]) -> dict[str, int]:
        """Longest matching prefix, in blocks, for every worker that matches at least one block."""
        result: dict[str, int] = {}
        alive: set[str] | None = None
        for i, h in enumerate(hashes):
            owners = self._by_hash.get(h, set())
            current = set(owners) if alive is None else alive & owners
            for w in (alive or set()) - current:
                result[w] = i
            alive = current
            if not alive:
                break
        for w in alive or ():
            result[w] = len(hashes)
        return result

    def workers(self) -> list[str]:
        return sorted(self._by_worker)

    def num_blocks(self, worker_id: str) -> int:
        return len(self._by_worker.get(worker_id, ()))

    def __len__(self) -> int:
        return len(self._by_hash)

    def check_integrity(self) -> None:
        """Both maps describe the same (worker, hash) pairs; tests run this after each change."""
        pairs_fwd = {(w, h) for w, hs in self._by_worker.items() for h in hs}
        pairs_rev = {(w, h) for h, ws in self._by_hash.items() for w in ws}
        if pairs_fwd != pairs_rev:
            raise AssertionError(f"prefix index maps disagree: {len(pairs_fwd ^ pairs_rev)} pairs differ")
        if any(not ws for ws in self._by_hash.values()):
            raise AssertionError("prefix index holds a hash with no owner")
