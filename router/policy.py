"""Routing: which decode worker runs a request, and whether a prefill worker computes its prompt.

Costs are in prompt-token equivalents, so the terms can be compared:

- prefill work left after the cache hit: prompt tokens the worker does not hold in its prefix
  cache (known exactly from the workers' KV events, see `PrefixIndex`);
- the worker's queue: prompt tokens already waiting for it (``queued_prefill_tokens``);
- its running decode load: each running or queued sequence costs ``decode_weight`` tokens
  (one more sequence makes every later decode step slower), and KV pressure costs up to
  ``kv_weight`` tokens as the cache fills (a full cache preempts).

Conditional disaggregation: a prompt whose *uncached* part on some acceptable decode worker is
at most ``disagg_threshold`` tokens is prefilled there (moving its KV would cost more than
computing it). Otherwise a prefill worker computes it, unless the prefill pool is empty,
excluded after failures, or overloaded (every worker has more than ``prefill_queue_limit``
tokens queued), in which case decode prefills locally rather than wait.
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from protocol.registry import BlockHash, LoadSnapshot, WorkerInfo
from router.errors import NoWorkersError, QueueFullError
from router.prefix_index import PrefixIndex


@dataclass(frozen=True)
class WorkerState:
    """A live worker with its latest load (a fresh worker with no heartbeat yet looks idle)."""

    info: WorkerInfo
    load: LoadSnapshot

    @classmethod
    def of(cls, info: WorkerInfo, load: LoadSnapshot | None) -> WorkerState:
        if load is None:
            load = LoadSnapshot(free_blocks=info.num_blocks, total_blocks=info.num_blocks)
        return cls(info, load)

    @property
    def worker_id(self) -> str:
        return self.info.worker_id


@dataclass(frozen=True)
class ClusterSnapshot:
    """What a policy decides from: live workers by pool and the prefix index."""

    decode: Sequence[WorkerState] = ()
    prefill: Sequence[WorkerState] = ()
    index: PrefixIndex = field(default_factory=PrefixIndex)


@dataclass(frozen=True)
class RouteDecision:
    decode_worker_id: str
    prefill_worker_id: str | None
    decode_cached_tokens: int  # prompt tokens the decode worker holds
    prefill_cached_tokens: int = 0  # prompt tokens the prefill worker holds
    reason: str = ""  # short_prompt | decode_cached | disaggregated | no_prefill_pool | prefill_overloaded

    @property
    def disaggregated(self) -> bool:
        return self.prefill_worker_id is not None


@dataclass(frozen=True)
class PolicySettings:
    block_size: int = 16
    disagg_threshold: int = 256
    prefill_queue_limit: int = 16384
    max_queued_requests: int = 256
    decode_weight: float = 32.0  # prompt tokens one running/queued sequence is worth
    kv_weight: float = 1024.0  # prompt tokens a completely full KV cache is worth
    transfer_weight: float = 0.05  # per uncached token a decode worker must receive over the wire


class RoutingPolicy(abc.ABC):
    """Chooses workers for one request; stateless but for what a policy keeps itself."""

    def __init__(self, settings: PolicySettings) -> None:
        self.settings = settings

    @abc.abstractmethod
    def route(
        self,
        prompt_len: int,
        block_hashes: Sequence[BlockHash],
        cluster: ClusterSnapshot,
        exclude: frozenset[str] = frozenset(),
    ) -> RouteDecision:
        """Pick workers, skipping ids in ``exclude`` (workers that already failed this request).

        Raises `NoWorkersError` when no decode worker is live and `QueueFullError` when every
        live one has a full queue.
        """

    def _decode_candidates(self, cluster: ClusterSnapshot, exclude: frozenset[str]) -> list[WorkerState]:
        live = [w for w in cluster.decode if w.worker_id not in exclude]
        if not live:
            raise NoWorkersError("no decode worker is available")
        ok = [w for w in live if w.load.queued_requests < self.settings.max_queued_requests]
        if not ok:
            raise QueueFullError("all decode workers' queues are full; retry later", retry_after_s=1.0)
        return ok

    def _prefill_candidates(
        self, cluster: ClusterSnapshot, exclude: frozenset[str]
    ) -> tuple[list[WorkerState], str]:
        live = [w for w in cluster.prefill if w.worker_id not in exclude]
        if not live:
            return [], "no_prefill_pool"
        ok = [w for w in live if w.load.queued_prefill_tokens <= self.settings.prefill_queue_limit]
        return ok, ("" if ok else "prefill_overloaded")

    def _cached_tokens(self, overlap_blocks: int, prompt_len: int) -> int:
        # the last prompt token is always computed: its logits give the first output token
        return min(overlap_blocks * self.settings.block_size, max(prompt_len - 1, 0))


POLICIES: dict[str, type[RoutingPolicy]] = {}


def register_policy(name: str) -> Callable[[type[RoutingPolicy]], type[RoutingPolicy]]:
    def deco(cls: type[RoutingPolicy]) -> type[RoutingPolicy]:
        POLICIES[name] = cls
        return cls

    return deco


def make_policy(name: str, settings: PolicySettings) -> RoutingPolicy:
    try:
        return POLICIES[name](settings)
    except KeyError:
        raise ValueError(f"router.policy: unknown policy {name!r}; known: {sorted(POLICIES)}") from None


@register_policy("kv_aware")
class KVAwarePolicy(RoutingPolicy):
    """Least cost from exact prefix overlap and load; see the module docstring."""

    def route(
        self,
        prompt_len: int,
        block_hashes: Sequence[BlockHash],
        cluster: ClusterSnapshot,
        exclude: frozenset[str] = frozenset(),
    ) -> RouteDecision:
        s = self.settings
        decode = self._decode_candidates(cluster, exclude)
        overlaps = cluster.index.overlaps(block_hashes) if block_hashes else {}
        cached = {w.worker_id: self._cached_tokens(overlaps.get(w.worker_id, 0), prompt_len) for w in decode}

        def decode_cost(w: WorkerState, local: bool) -> float:
            uncached = prompt_len - cached[w.worker_id]
            load = w.load
            new_blocks = -(-uncached // s.block_size) + 1
            used = load.total_blocks - load.free_blocks + new_blocks
            kv_after = min(used / load.total_blocks, 1.0) if load.total_blocks > 0 else 0.0
            return (
                (uncached if local else s.transfer_weight * uncached)
                + load.queued_prefill_tokens
                + s.decode_weight * (load.running_requests + load.queued_requests)
                + s.kv_weight * kv_after * kv_after
            )

        def by_cost(ws: Sequence[WorkerState], cost: Callable[[WorkerState], float]) -> WorkerState:
            return min(ws, key=lambda w: (cost(w), w.worker_id))  # id breaks ties deterministically

        local_ok = [w for w in decode if prompt_len - cached[w.worker_id] <= s.disagg_threshold]
        if local_ok:
            best = by_cost(local_ok, lambda w: decode_cost(w, True))
            c = cached[best.worker_id]
            return RouteDecision(best.worker_id, None, c, 0, "decode_cached" if c else "short_prompt")

        prefill, why_not = self._prefill_candidates(cluster, exclude)
        if not prefill:
            best = by_cost(decode, lambda w: decode_cost(w, True))
            return RouteDecision(best.worker_id, None, cached[best.worker_id], 0, why_not)

        d = by_cost(decode, lambda w: decode_cost(w, False))
        p_cached = {
            w.worker_id: self._cached_tokens(overlaps.get(w.worker_id, 0), prompt_len) for w in prefill
        }
        p = by_cost(prefill, lambda w: prompt_len - p_cached[w.worker_id] + w.load.queued_prefill_tokens)
        return RouteDecision(
            d.worker_id, p.worker_id, cached[d.worker_id], p_cached[p.worker_id], "disaggregated"
        )


@register_policy("round_robin")
class RoundRobinPolicy(RoutingPolicy):
    """Cache-blind baseline: rotate over each pool; disaggregate on the full prompt length."""

    def __init__(self, settings: PolicySettings) -> None:
        super().__init__(settings)
        self._decode_turn = itertools.count()
        self._prefill_turn = itertools.count()

    def route(
        self,
        prompt_len: int,
        block_hashes: Sequence[BlockHash],
        cluster: ClusterSnapshot,
        exclude: frozenset[str] = frozenset(),
    ) -> RouteDecision:
        decode = sorted(self._decode_candidates(cluster, exclude), key=lambda w: w.worker_id)
        d = decode[next(self._decode_turn) % len(decode)]
        if prompt_len <= self.settings.disagg_threshold:
            return RouteDecision(d.worker_id, None, 0, 0, "short_prompt")
        prefill, why_not = self._prefill_candidates(cluster, exclude)
        if not prefill:
            return RouteDecision(d.worker_id, None, 0, 0, why_not)
        prefill.sort(key=lambda w: w.worker_id)
        p = prefill[next(self._prefill_turn) % len(prefill)]
        return RouteDecision(d.worker_id, p.worker_id, 0, 0, "disaggregated")
