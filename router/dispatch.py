"""From a tokenized prompt to a token stream: the router's view of the cluster, routing, retries.

`ClusterView` mirrors the control plane locally (live workers and loads polled from Redis,
the prefix index fed by tailing the KV event stream), so routing a request never waits on a
network round trip. `Dispatcher` asks the policy for workers, opens the backend stream, and
re-routes when a worker fails before the first token: a failed prefill worker is excluded
(the next attempt uses another, or prefills on decode), a failed decode worker likewise.
After the first token, `stream` hands over to `router.migration`, which resumes a sequence
whose decode worker was lost on another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass

from engine.block_hash import prompt_block_hashes
from engine.sampling_params import SamplingParams
from protocol.control_plane import ControlPlane
from protocol.registry import KVEventBatch, LoadSnapshot, WorkerInfo
from router.backend import GenerateRequest, GenerationBackend, TokenDelta
from router.errors import PrefillFailedError, WorkerUnavailableError
from router.metrics import RouterMetrics
from router.policy import ClusterSnapshot, RouteDecision, RoutingPolicy, WorkerState
from router.prefix_index import PrefixIndex

log = logging.getLogger(__name__)


class ClusterView:
    """Live workers, their loads and the prefix index, as the router last saw them.

    Without a control plane the view is static: tests (or an embedding program) set workers
    with `update_workers` and feed `apply_kv_events` themselves; with no workers at all the
    backend picks (a single-process backend).
    """

    def __init__(
        self, control_plane: ControlPlane | None = None, poll_interval_s: float = 0.25, kv_block_ms: int = 250
    ) -> None:
        self.control_plane = control_plane
        self.poll_interval_s = poll_interval_s
        self.kv_block_ms = kv_block_ms
        self.index = PrefixIndex()
        self._workers: dict[str, WorkerState] = {}
        self._kv_last_id = "0-0"
        self._kv_server = ""  # the Redis run id the stream position belongs to
        self._tasks: list[asyncio.Task[None]] = []
        self.control_plane_ok = True  # the last registry poll reached Redis
        self._pools_seen: set[str] = set()  # pools that had a live worker at some point

    @property
    def static(self) -> bool:
        return self.control_plane is None

    def update_workers(self, live: Iterable[tuple[WorkerInfo, LoadSnapshot | None]]) -> None:
        """Replace the live set; a worker that dropped out loses its prefix-index entries."""
        new = {info.worker_id: WorkerState.of(info, load) for info, load in live}
        self._pools_seen.update(w.info.pool for w in new.values())
        for gone in self._workers.keys() - new.keys():
            self.index.remove_worker(gone)
        self._workers = new

    def apply_kv_events(self, batches: Iterable[KVEventBatch]) -> None:
        for b in batches:
            self.index.apply(b.worker_id, b.events)

    def worker(self, worker_id: str) -> WorkerState | None:
        return self._workers.get(worker_id)

    def workers(self) -> list[WorkerState]:
        return sorted(self._workers.values(), key=lambda w: w.worker_id)

    def snapshot(self) -> ClusterSnapshot:
        """The workers to route new requests to: a draining one still serves (and stays in
        `workers`) but takes nothing new."""
        ws = [w for w in self.workers() if not w.load.draining]
        return ClusterSnapshot(
            decode=[w for w in ws if w.info.pool == "decode"],
            prefill=[w for w in ws if w.info.pool == "prefill"],
            index=self.index,
        )

    def degraded(self) -> list[str]:
        """Why the cluster cannot serve as configured right now (empty: it can): Redis
        unreachable, or a pool that had workers has none left."""
        if self.static:
            return []
        why = [] if self.control_plane_ok else ["control plane unreachable"]
        snap = self.snapshot()
        for pool, live in (("decode", snap.decode), ("prefill", snap.prefill)):
            if not live and (pool == "decode" or pool in self._pools_seen):
                why.append(f"no live {pool} worker")
        return why

    async def refresh(self) -> None:
        """One registry poll (the background loop calls this; tests may too)."""
        if self.control_plane is not None:
            try:
                live = await asyncio.to_thread(self.control_plane.live_workers)
            except Exception:
                self.control_plane_ok = False
                raise
            self.control_plane_ok = True
            self.update_workers(live)

    async def start(self) -> None:
        if self.control_plane is None or self._tasks:
            return
        await self.refresh()
        self._tasks = [asyncio.create_task(self._poll_loop()), asyncio.create_task(self._kv_loop())]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.refresh()
            except Exception as e:  # Redis down: keep routing on the last view
                log.warning("worker registry poll failed: %s", e)

    async def _kv_loop(self) -> None:
        cp = self.control_plane
        assert cp is not None
        while True:
            try:
                server = await asyncio.to_thread(cp.server_id) if not self._kv_server else self._kv_server
                if server != self._kv_server:  # first read, or Redis restarted: its stream is new
                    self._kv_server, self._kv_last_id = server, "0-0"
                self._kv_last_id, batches = await asyncio.to_thread(
                    cp.read_kv_events, self._kv_last_id, self.kv_block_ms
                )
            except Exception as e:
                log.warning("KV event stream read failed: %s", e)
                self._kv_server = ""  # check the server's identity before reading on
                await asyncio.sleep(self.poll_interval_s)
                continue
            # events of a worker not yet seen in the registry are kept: it registered first
            self.apply_kv_events(batches)


@dataclass(frozen=True)
class RoutedPrompt:
    """A prompt's block hashes and its first routing decision, shared by its ``n`` choices."""

    prompt_token_ids: list[int]
    block_hashes: Sequence[int]
    decision: RouteDecision | None  # None: static view without workers, the backend picks


class Dispatcher:
    """Routes prompts and opens backend streams, retrying failed workers before the first token."""

    def __init__(
        self,
        backend: GenerationBackend,
        cluster: ClusterView,
        policy: RoutingPolicy,
        metrics: RouterMetrics,
        max_retries: int = 2,
        max_migrations: int = 3,
        migration_wait_s: float = 120.0,
    ) -> None:
        self.backend = backend
        self.cluster = cluster
        self.policy = policy
        self.metrics = metrics
        self.max_retries = max_retries
        self.max_migrations = max_migrations  # mid-stream moves of one sequence to another worker
        self.migration_wait_s = migration_wait_s  # how long a lost stream waits for a decode worker

    def _decide(
        self, routed_len: int, hashes: Sequence[int], exclude: frozenset[str]
    ) -> RouteDecision | None:
        snap = self.cluster.snapshot()
        if self.cluster.static and not snap.decode:
            return None
        decision = self.policy.route(routed_len, hashes, snap, exclude)
        self.metrics.routes.labels(decision.reason).inc()
        return decision

    def route(self, prompt_token_ids: list[int]) -> RoutedPrompt:
        """Hash and route a prompt; raises `QueueFullError` / `NoWorkersError` before any work."""
        hashes: Sequence[int] = ()
        if self.cluster.workers():
            hashes = prompt_block_hashes(prompt_token_ids, self.policy.settings.block_size)
        decision = self._decide(len(prompt_token_ids), hashes, frozenset())
        if decision is not None:
            self.metrics.cached_prompt_tokens.inc(decision.decode_cached_tokens)
        return RoutedPrompt(prompt_token_ids, hashes, decision)

    def _excluded(self, lost: Iterable[tuple[str, str]]) -> set[str]:
        """Ids of workers whose current incarnation (id, address) failed this request; a worker
        restarted under the same id on a new address is a fresh candidate."""
        lost = set(lost)
        return {w.worker_id for w in self.cluster.workers() if (w.worker_id, w.info.address) in lost}

    def _address(self, worker_id: str) -> str:
        w = self.cluster.worker(worker_id)
        return w.info.address if w is not None else ""

    async def open(
        self, routed: RoutedPrompt, request_id: str, params: SamplingParams, deadline: float | None = None,
        lost: set[tuple[str, str]] | None = None, local_prefill: bool = False,
    ) -> OpenStream | None:
        """The first delta of one sequence and the rest of its stream, retrying failed workers
        before that first delta; failed decode incarnations are added to ``lost``.
        ``local_prefill``: the decode worker computes the prompt (a resumed request). None: the
        backend ended the stream without a delta."""
        lost = set() if lost is None else lost
        decision = routed.decision
        exclude: set[str] = self._excluded(lost)
        if decision is None or decision.decode_worker_id in exclude or local_prefill:
            decision = self._decide(len(routed.prompt_token_ids), routed.block_hashes, frozenset(exclude))
        attempt = 0
        while True:
            if decision is not None and local_prefill:
                decision = dataclasses.replace(decision, prefill_worker_id=None)
            req = GenerateRequest(
                request_id=request_id if attempt == 0 else f"{request_id}-r{attempt}",
                prompt_token_ids=routed.prompt_token_ids,
                sampling_params=params,
                decode_worker_id=decision.decode_worker_id if decision else None,
                prefill_worker_id=decision.prefill_worker_id if decision else None,
                expected_cached_tokens=decision.decode_cached_tokens if decision else 0,
                deadline=deadline,
            )
            agen = self.backend.generate(req)
            try:
                first = await anext(agen)
            except StopAsyncIteration:
                return None
            except (PrefillFailedError, WorkerUnavailableError) as e:
                await agen.aclose()
                if isinstance(e, WorkerUnavailableError) and decision is not None:
                    lost.add((e.worker_id, self._address(e.worker_id)))
                if decision is None or attempt >= self.max_retries:
                    raise
                attempt += 1
                failed_pool = "prefill" if isinstance(e, PrefillFailedError) else "decode"
                self.metrics.retries.labels(failed_pool).inc()
                log.warning("request %s: %s; re-routing (attempt %d)", request_id, e, attempt)
                exclude.add(e.worker_id)
                if failed_pool == "prefill" and attempt == self.max_retries:
                    # last chance: no more prefill workers, decode computes the prompt itself
                    exclude.update(w.worker_id for w in self.cluster.snapshot().prefill)
                decision = self._decide(len(routed.prompt_token_ids), routed.block_hashes, frozenset(exclude))
                continue
            except BaseException:
                await agen.aclose()
                raise
            worker = decision.decode_worker_id if decision else ""
            return OpenStream(first, agen, worker, self._address(worker) if worker else "")

    def stream(
        self, routed: RoutedPrompt, request_id: str, params: SamplingParams, deadline: float | None = None
    ) -> AsyncIterator[TokenDelta]:
        """Deltas of one sequence, migrated to another decode worker if its own is lost
        mid-stream (`router.migration`). Closing this generator closes the backend stream."""
        from router.migration import migrating_stream  # it drives this class: imported late

        return migrating_stream(self, routed, request_id, params, deadline)


@dataclass
class OpenStream:
    """A sequence's stream once it delivered its first delta, and who serves it."""

    first: TokenDelta
    rest: AsyncGenerator[TokenDelta, None]
    decode_worker_id: str  # "" when the backend picked (no registry)
    decode_address: str


def deadline_after(timeout_s: float | None) -> float | None:
    return None if timeout_s is None else time.monotonic() + timeout_s
