"""`Launcher`: the seam between "which workers should run" and "how processes come to exist".

A launcher starts worker groups, reports on them and stops them; it knows nothing about Redis,
the router or request traffic. Local child processes (`cluster.local_launcher`) are the first
implementation; a Ray Serve launcher is meant to be the second, so this interface promises
nothing about PIDs, signals or files beyond what a handle reports.

Contract, for every implementation:

- **Ownership.** The launcher owns every process (or actor) it starts: `stop` and `close` end
  them, and nothing it started may outlive it (the local launcher adds a parent-death watch
  through the environment its caller passes; a Ray launcher would rely on actor lifetimes).
- **Ready** means every rank of the group serves its gRPC endpoint and KV transport and has
  reported it (`ReadyInfo`: worker id, address, transport agent name). *Registered* (visible in
  the control plane) is a later step that the composition layer checks: launchers don't read Redis.
- **Failure at start** is an exception carrying the failing rank's log tail, never a hang:
  `wait_ready` raises `WorkerStartError` when a rank exits or the deadline passes.
- **Stop** is graceful first (the worker drains and leaves the registry), then forced after a
  grace period; it returns each group's final `GroupStatus`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine.errors import SplitserveError
from protocol.worker_spec import WorkerSpec


class LauncherError(SplitserveError):
    """A launcher cannot run what it was asked to (e.g. a group shape it does not support)."""


class WorkerStartError(LauncherError):
    """A worker exited or timed out before it was ready; the message has its log tail."""


class StartCancelled(LauncherError):
    """The caller's ``cancelled()`` turned true while groups were starting."""


@dataclass(frozen=True)
class WorkerGroupSpec:
    """One logical worker: ``tp x pp`` ranks serving as one prefill or decode endpoint.

    ``ranks`` is in rank order (pp-major, then tp); rank 0 is the group's entry point, the one
    whose address the router dials. Today every group has one rank.
    """

    ranks: tuple[WorkerSpec, ...]
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise LauncherError(f"group shape must be positive, got tp={self.tp} pp={self.pp}")
        if len(self.ranks) != self.tp * self.pp:
            raise LauncherError(f"a tp={self.tp} x pp={self.pp} group needs {self.tp * self.pp} rank specs, "
                                f"got {len(self.ranks)}")
        if len({r.role for r in self.ranks}) != 1:
            raise LauncherError("all ranks of a group must have the same role")

    @classmethod
    def single(cls, spec: WorkerSpec) -> WorkerGroupSpec:
        return cls((spec,))

    @property
    def role(self) -> str:
        return self.ranks[0].role

    @property
    def name(self) -> str:
        """The worker id of rank 0 (may be empty: the worker then names itself when bound)."""
        return self.ranks[0].worker_id

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


@dataclass(frozen=True)
class ReadyInfo:
    """What a ready rank reported: enough for a client to dial it and a peer to handshake."""

    worker_id: str
    address: str
    agent_name: str


@dataclass(frozen=True)
class GroupStatus:
    """A group's state as its launcher sees it.

    ``exit_code`` is None while every rank runs; once a rank ended, the first non-zero code (or
    0 when all ended cleanly). ``log`` is where to look (a folder, a URL, an actor id).
    """

    alive: bool
    exit_code: int | None
    log: str

    @property
    def clean_exit(self) -> bool:
        return not self.alive and self.exit_code == 0


class WorkerGroupHandle(ABC):
    """A started group: read-only from the outside; lifecycle calls go through its launcher."""

    def __init__(self, spec: WorkerGroupSpec) -> None:
        self.spec = spec
        self.info: ReadyInfo | None = None  # set by `Launcher.wait_ready`

    @property
    def role(self) -> str:
        return self.spec.role

    @property
    def worker_id(self) -> str:
        return self.info.worker_id if self.info else self.spec.name

    @property
    def address(self) -> str:
        if self.info is None:
            raise LauncherError(f"{self.spec.name or self.role} worker is not ready yet")
        return self.info.address

    @abstractmethod
    def poll_ready(self) -> ReadyInfo | None:
        """Rank 0's report once every rank is ready, else None; never blocks."""

    @abstractmethod
    def status(self) -> GroupStatus: ...

    @abstractmethod
    def log_tail(self, n: int = 4000) -> str:
        """The last ``n`` characters of the group's logs (for error messages)."""

    def alive(self) -> bool:
        return self.status().alive


class Launcher(ABC):
    """Starts, watches and stops worker groups; a context manager that closes on exit."""

    @property
    @abstractmethod
    def log_location(self) -> str:
        """Where the workers' logs go (a folder, a dashboard URL), for the operator."""

    @abstractmethod
    def start(self, groups: Sequence[WorkerGroupSpec]) -> list[WorkerGroupHandle]:
        """Begin starting every group and return at once (model loads then run in parallel)."""

    @abstractmethod
    def stop(self, handles: Sequence[WorkerGroupHandle] | None = None, grace_s: float = 15.0) -> list[GroupStatus]:
        """Graceful stop, forced after ``grace_s``; None stops every group this launcher started."""

    @abstractmethod
    def kill(self, handle: WorkerGroupHandle) -> None:
        """Abrupt death of every rank, with no goodbye (what failure handling must survive)."""

    def restart(self, handle: WorkerGroupHandle) -> None:
        """Start a dead group again with its original specs, in place (the handle reports the new
        processes; its ``info`` is cleared until they are ready again). For `cluster.supervisor`."""
        raise LauncherError(f"{type(self).__name__} cannot restart worker groups")

    @abstractmethod
    def close(self) -> str | None:
        """Stop what still runs and release the launcher's resources. Returns where logs were
        kept for a post-mortem (some group ended unclean), or None when nothing needs a look."""

    def wait_ready(self, handles: Sequence[WorkerGroupHandle], timeout: float,
                   cancelled: Callable[[], bool] = lambda: False) -> None:
        """Wait until every group is ready (then each handle's ``info`` is set); polls all at once,
        so loads overlap. Raises `WorkerStartError` for the first group that exits, or after
        ``timeout`` (the late groups are killed), and `StartCancelled`; other groups keep
        running: the caller stops them (`stop`/`close`)."""
        deadline = time.monotonic() + timeout
        pending = list(handles)
        while pending:
            for h in list(pending):
                info = h.poll_ready()
                if info is not None:
                    h.info = info
                    pending.remove(h)
                    continue
                st = h.status()
                if not st.alive:
                    raise WorkerStartError(f"{h.spec.name or h.role} worker exited with {st.exit_code} "
                                           f"(log: {st.log}):\n{h.log_tail()}")
            if not pending:
                return
            if cancelled():
                raise StartCancelled("cancelled while the workers were starting")
            if time.monotonic() > deadline:
                for late in pending:  # a start that missed its deadline is not left loading
                    self.kill(late)
                h = pending[0]
                raise WorkerStartError(f"{h.spec.name or h.role} worker not ready after {timeout:.0f}s "
                                       f"(log: {h.status().log}):\n{h.log_tail()}")
            time.sleep(0.05)

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
