"""`WorkerAgent`: a worker's presence in the control plane, run as one background thread.

Routing is only as good as what the router knows, and only the worker knows it: whether it is
alive, how loaded it is, and which prefix blocks its cache holds. The agent registers the
worker's `WorkerInfo`, heartbeats a `LoadSnapshot` (the record expires ``ttl_s`` after the last
beat, so a killed worker drops out within seconds), and relays the `BlockManager`'s KV events
to the Redis stream the router tails.

Liveness must not depend on anything else the worker does: on a busy machine (issue 15: the
CPU shared with other work) a worker that serves fine but relays a large event batch slowly
must not expire. So the lease is renewed by a thread of its own (``worker-heartbeat``) that
does nothing else, on its own Redis connection from the pool, every ``heartbeat_s``; the
registry TTL must be at least `MIN_TTL_BEATS` of those intervals, so several beats in a row
can be late or lost before the router declares the worker dead.

Thread safety: the `BlockManager` belongs to the engine thread. The engine thread hands its
drained events to a `KVEventRelay` (a locked list swap, nothing else is shared), and reads of
the load come from the immutable snapshot the worker loops already publish for ``Status``.

The agent keeps a mirror of the cached hashes, built from the very events it relays. When the
registration lapsed (the router then dropped the worker's prefix-index entries) or Redis was
unreachable (events may be lost), it re-registers and publishes ``cleared`` followed by the
mirror, so the router's index is exact again without asking the engine thread for anything.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import redis

from protocol.control_plane import ControlPlane
from protocol.registry import KVEvent, LoadSnapshot, WorkerInfo
from protocol.worker_spec import TOKEN_ENV

log = logging.getLogger(__name__)

REDIS_URL_ENV = "SPLITSERVE_REDIS_URL"
"""Set by the launcher; a worker started without it runs unregistered (tests of one pair)."""
REGISTRY_TTL_ENV = "SPLITSERVE_REGISTRY_TTL_S"
PARENT_PID_ENV = "SPLITSERVE_PARENT_PID"
"""The launcher's pid: a worker whose launcher died (even by SIGKILL) stops itself."""

DEFAULT_TTL_S = 3.0
MIN_TTL_BEATS = 3
"""The registry TTL spans at least this many heartbeat intervals (`WorkerAgent` refuses less)."""


class _EngineEvent(Protocol):
    """`engine.block_manager.KVEvent`, whose extra ``parent_hash`` the router does not need
    (a chained hash already names its whole prefix)."""

    @property
    def kind(self) -> str: ...

    @property
    def block_hashes(self) -> tuple[int, ...]: ...


class KVEventRelay:
    """Hands KV events from the engine thread to the agent thread.

    The engine thread calls ``push(blocks.drain_events())`` once per loop iteration (an empty
    list costs a lock round trip); the agent calls `drain`. Events keep their order.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[KVEvent] = []

    def push(self, events: Iterable[_EngineEvent]) -> None:
        converted = [KVEvent(e.kind, tuple(e.block_hashes)) for e in events]  # type: ignore[arg-type]
        if converted:
            with self._lock:
                self._events.extend(converted)

    def drain(self) -> list[KVEvent]:
        with self._lock:
            events, self._events = self._events, []
        return events


def load_from_snapshot(snapshot: Any) -> LoadSnapshot:
    """A `LoadSnapshot` from a worker loop's ``snapshot()`` (`PrefillSnapshot` / `DecodeSnapshot`
    share the field names; only prefill counts queued prompt tokens)."""
    return LoadSnapshot(
        queued_requests=int(snapshot.num_waiting),
        queued_prefill_tokens=int(getattr(snapshot, "queued_prefill_tokens", 0)),
        running_requests=int(snapshot.num_running),
        free_blocks=int(snapshot.num_free_blocks),
        total_blocks=int(snapshot.num_total_blocks),
        integrity_ok=not getattr(snapshot, "integrity_error", ""),
    )


class WorkerAgent:
    """Registers, heartbeats and relays KV events for one worker; see the module docstring.

    ``load`` and ``drain_kv_events`` are called on the agent thread and must be safe there.
    Redis failures are logged and retried (the worker keeps serving what it already has);
    ``on_parent_death`` runs once if ``parent_pid`` stops being our parent.
    """

    def __init__(
        self,
        control_plane: ControlPlane,
        info: WorkerInfo,
        load: Callable[[], LoadSnapshot],
        drain_kv_events: Callable[[], Sequence[KVEvent]],
        *,
        heartbeat_s: float = 0.5,
        tick_s: float = 0.02,
        load_interval_s: float = 0.1,
        parent_pid: int | None = None,
        on_parent_death: Callable[[], None] | None = None,
    ) -> None:
        if heartbeat_s <= 0 or tick_s <= 0:
            raise ValueError("heartbeat_s and tick_s: must be > 0")
        ttl_s = control_plane.ttl_ms / 1000
        if ttl_s < MIN_TTL_BEATS * heartbeat_s:
            raise ValueError(f"heartbeat_s: must be at most 1/{MIN_TTL_BEATS} of the registry TTL "
                             f"({ttl_s:g}s), got {heartbeat_s:g}s")
        self.control_plane = control_plane
        self.info = info
        self._worker_load = load
        self._drain = drain_kv_events
        self.heartbeat_s = heartbeat_s
        self.tick_s = tick_s
        self.load_interval_s = load_interval_s  # a changed load is published at most this often
        self._parent_pid = parent_pid
        self._on_parent_death = on_parent_death
        self._cached: set[int | bytes] = set()  # mirror of the worker's prefix cache
        self._synced = False  # registered and the router has the full mirror
        self._last_beat = 0.0
        self._last_load: LoadSnapshot | None = None
        self._last_error = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-agent", daemon=True)
        self._beat_thread = threading.Thread(target=self._beat_loop, name="worker-heartbeat", daemon=True)
        self.beats = 0  # successful lease renewals by the heartbeat thread (tests read it)
        self.draining = False  # set by `drain`: every load published from then on says so

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    def start(self) -> WorkerAgent:
        self._thread.start()
        self._beat_thread.start()
        return self

    def _load(self) -> LoadSnapshot:
        load = self._worker_load()
        return dataclasses.replace(load, draining=True) if self.draining else load

    def drain(self) -> None:
        """Stay registered (streams in flight keep their worker) but tell the router to send
        nothing new; the launcher stops the worker once it is idle. Published at once."""
        self.draining = True
        try:
            self.control_plane.heartbeat(self.worker_id, self._load())
        except Exception as e:  # the agent's next tick publishes it
            log.warning("worker %s: could not publish draining: %s", self.worker_id, e)

    def stop(self, deregister: bool = True) -> None:
        """Stop beating and (by default) leave the registry at once instead of after the TTL."""
        self._stop.set()
        for t in (self._thread, self._beat_thread):
            if t.is_alive() and t is not threading.current_thread():
                t.join(5.0)
        if deregister:
            try:
                self.control_plane.publish_kv_events(self.worker_id, [KVEvent("cleared")])
                self.control_plane.deregister_worker(self.worker_id)
            except Exception as e:
                log.warning("worker %s: could not deregister: %s", self.worker_id, e)

    # ---- the agent thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick(time.monotonic())
            except Exception as e:  # Redis down: the next successful tick resynchronizes
                self._synced = False
                now = time.monotonic()
                if now - self._last_error > 5.0:
                    self._last_error = now
                    log.warning("worker %s: control plane unreachable: %s", self.worker_id, e)
            if self._parent_gone():
                log.warning("worker %s: launcher %s is gone; stopping", self.worker_id, self._parent_pid)
                self._stop.set()
                if self._on_parent_death is not None:
                    self._on_parent_death()
                return
            self._stop.wait(self.tick_s)

    def _beat_loop(self) -> None:
        """The heartbeat thread: renew the lease every ``heartbeat_s``, whatever the agent thread
        is doing. Registering (and resyncing the cache mirror) stays with the agent thread: a
        lapsed lease only marks the agent unsynced."""
        last_error = 0.0
        while not self._stop.wait(self.heartbeat_s):
            if not self._synced:
                continue
            try:
                if self.control_plane.heartbeat(self.worker_id, self._load()):
                    self.beats += 1
                else:
                    self._synced = False
            except Exception as e:
                now = time.monotonic()
                if now - last_error > 5.0:
                    last_error = now
                    log.warning("worker %s: heartbeat failed: %s", self.worker_id, e)

    def tick(self, now: float) -> None:
        """One round: relay new events (every tick: the router's prefix index should lag by
        milliseconds), then beat when the load changed; the periodic beats are the heartbeat
        thread's alone (liveness never waits for this thread, and an idle worker beats once per
        interval, not twice)."""
        cp = self.control_plane
        events = list(self._drain())
        self._mirror(events)
        load = self._load()
        if not self._synced:
            self._resync(load, now)
            return
        if events:
            cp.publish_kv_events(self.worker_id, events)
        since = now - self._last_beat
        changed = self._last_load is None or _load_key(load) != _load_key(self._last_load)
        if changed and since >= self.load_interval_s:  # periodic beats are the beat thread's
            if cp.heartbeat(self.worker_id, load):
                self._last_beat, self._last_load = now, load
            else:
                log.warning("worker %s: registration expired; registering again", self.worker_id)
                self._resync(load, now)

    def _resync(self, load: LoadSnapshot, now: float) -> None:
        cp = self.control_plane
        cp.register_worker(self.info, load)
        events = [KVEvent("cleared")]
        if self._cached:
            events.append(KVEvent("stored", tuple(self._cached)))
        cp.publish_kv_events(self.worker_id, events)
        self._synced = True
        self._last_beat, self._last_load = now, load

    def _mirror(self, events: Iterable[KVEvent]) -> None:
        for ev in events:
            if ev.kind == "stored":
                self._cached.update(ev.block_hashes)
            elif ev.kind == "removed":
                self._cached.difference_update(ev.block_hashes)
            elif ev.kind == "cleared":
                self._cached.clear()

    def _parent_gone(self) -> bool:
        return self._parent_pid is not None and os.getppid() != self._parent_pid

    @property
    def cached_hashes(self) -> frozenset[int | bytes]:
        """The mirror (agent thread's view; tests read it once the thread is idle)."""
        return frozenset(self._cached)


def _load_key(load: LoadSnapshot) -> tuple[int, ...]:
    return (load.queued_requests, load.queued_prefill_tokens, load.running_requests, load.free_blocks,
            int(load.integrity_ok))


def attach_worker_agent(
    worker: Any,
    *,
    pool: str,
    num_blocks: int,
    block_size: int,
    load: Callable[[], LoadSnapshot],
    kv_events: KVEventRelay,
    max_num_seqs: int = 0,
    max_batched_tokens: int = 0,
    transport: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> WorkerAgent | None:
    """Start the agent of a started `worker_runtime.runtime.RunningWorker` when the launcher
    gave a Redis URL (``SPLITSERVE_REDIS_URL``); registers ``worker.on_stop`` so that stopping
    the worker deregisters it first. Returns None when there is no control plane to join."""
    env = os.environ if environ is None else environ
    url = env.get(REDIS_URL_ENV, "")
    if not url:
        return None
    ttl_s = float(env.get(REGISTRY_TTL_ENV, DEFAULT_TTL_S))
    parent = int(env[PARENT_PID_ENV]) if env.get(PARENT_PID_ENV) else None
    # bounded socket waits: an unreachable Redis must never hold up the worker's shutdown
    client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
    cp = ControlPlane(client, ttl_s=ttl_s, token=env.get(TOKEN_ENV, ""))  # records sealed with the token
    info = WorkerInfo(
        worker_id=worker.worker_id,
        pool=pool,  # type: ignore[arg-type]
        address=worker.address,
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_batched_tokens=max_batched_tokens,
        transport={"agent_name": worker.agent_name, **(transport or {})},
    )
    agent = WorkerAgent(
        cp, info, load, kv_events.drain, heartbeat_s=min(0.5, ttl_s / (2 * MIN_TTL_BEATS)),
        parent_pid=parent, on_parent_death=lambda: os.kill(os.getpid(), signal.SIGTERM),
    )
    agent.start()

    def stop() -> None:
        agent.stop()
        cp.close()

    worker.on_stop(stop)
    if hasattr(worker, "on_drain"):
        worker.on_drain(agent.drain)
    return agent
