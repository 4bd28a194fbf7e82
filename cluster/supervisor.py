"""`Supervisor`: restarts what died in a local cluster, with back-off and a limit.

A killed worker costs its pool capacity until someone starts it again; a killed embedded
redis-server costs the whole control plane. The supervisor is that someone, for what this
process launched: a thread that polls each worker group's status and the embedded Redis and
restarts the dead, the n-th restart of one process after ``backoff_s * 2**(n-1)`` seconds
(capped at `MAX_BACKOFF_S`), at most ``max_restarts`` times each (then it is reported and left
dead). Nothing here talks to the router or the workers: a restarted worker registers itself
and republishes its KV cache state (``cleared`` then ``stored``, `worker_runtime.agent`); a
restarted Redis keeps its port and password, so every client reconnects by itself, the
workers' agents find their records gone and register again, and the router's view rebuilds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from cluster.launcher import Launcher, LauncherError, WorkerGroupHandle

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
REDIS = "redis"  # the name the embedded redis-server is counted under


class RestartableRedis(Protocol):
    """`cluster.redis_server.EmbeddedRedis`: restarted on the same port with the same password."""

    @property
    def running(self) -> bool: ...

    def restart(self) -> object: ...


@dataclass(frozen=True)
class SupervisionPolicy:
    """What `cluster.config.SupervisionConfig` says, in the supervisor's terms."""

    restart_workers: bool = True
    restart_redis: bool = True
    max_restarts: int = 5
    backoff_s: float = 1.0

    def delay(self, restarts_so_far: int) -> float:
        return min(MAX_BACKOFF_S, self.backoff_s * 2 ** restarts_so_far) if restarts_so_far else 0.0


@dataclass
class _Record:
    restarts: int = 0
    died_at: float | None = None  # when this death was first seen
    given_up: bool = False
    waiting_ready: bool = False  # restarted; its ready report not read yet


class Supervisor:
    """Watches ``groups`` (started by ``launcher``) and ``redis``; see the module docstring.

    ``on_restart(name)`` runs after each successful restart (a worker id, or ``"redis"``); the
    composition layer counts them in the router's metrics."""

    def __init__(
        self, launcher: Launcher, groups: Sequence[WorkerGroupHandle], policy: SupervisionPolicy,
        redis: RestartableRedis | None = None, on_restart: Callable[[str], None] = lambda name: None,
        poll_s: float = 0.2,
    ) -> None:
        self.launcher = launcher
        self.groups = list(groups)
        self.policy = policy
        self.redis = redis
        self.on_restart = on_restart
        self.poll_s = poll_s
        self.records: dict[str, _Record] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop supervising (before a deliberate shutdown, which must not be undone)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(10.0)

    def restarts(self, name: str) -> int:
        return self.records[name].restarts if name in self.records else 0

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check(time.monotonic())
            except Exception:  # a failed restart is retried on the next poll, never fatal
                log.exception("supervisor: check failed")

    def check(self, now: float) -> None:
        """One pass: note deaths, restart the dead whose back-off elapsed, read ready reports."""
        if self.redis is not None and self.policy.restart_redis:
            self._maybe_restart(REDIS, not self.redis.running, now, self._restart_redis)
        if self.policy.restart_workers:
            for g in self.groups:
                rec = self.records.setdefault(g.spec.name, _Record())
                if rec.waiting_ready and (info := g.poll_ready()) is not None:
                    g.info, rec.waiting_ready = info, False
                    log.info("supervisor: %s ready again at %s", g.worker_id, info.address)
                self._maybe_restart(g.spec.name, not g.alive(), now, lambda g=g: self._restart_group(g))

    def _maybe_restart(self, name: str, dead: bool, now: float, restart: Callable[[], None]) -> None:
        rec = self.records.setdefault(name, _Record())
        if not dead:
            rec.died_at = None
            return
        if rec.given_up or self._stop.is_set():
            return
        if rec.died_at is None:
            rec.died_at = now
            log.warning("supervisor: %s died", name)
        if rec.restarts >= self.policy.max_restarts:
            rec.given_up = True
            log.error("supervisor: %s died again after %d restarts (supervision.max_restarts); leaving it down",
                      name, rec.restarts)
            return
        if now - rec.died_at < self.policy.delay(rec.restarts):
            return
        try:
            restart()
        except LauncherError as e:  # this launcher cannot restart: say so once, not every poll
            rec.given_up = True
            log.error("supervisor: cannot restart %s: %s", name, e)
            return
        rec.restarts += 1
        rec.died_at = None
        log.warning("supervisor: restarted %s (restart %d of at most %d)", name, rec.restarts,
                    self.policy.max_restarts)
        self.on_restart(name)

    def _restart_group(self, group: WorkerGroupHandle) -> None:
        self.launcher.restart(group)
        self.records[group.spec.name].waiting_ready = True

    def _restart_redis(self) -> None:
        assert self.redis is not None
        self.redis.restart()
