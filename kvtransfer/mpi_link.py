"""The mpi backend's progress engine: non-blocking MPI point-to-point on one thread.

Peers are ranks of one MPI job (``mpiexec`` MPMD, ``mpirun -n N``): ``COMM_WORLD`` and the
peer's rank. A peer in another job is refused at the handshake with a clear error: MPICH
5.0's dynamic processes are no option here — singleton processes cannot connect/accept at
all (pmodels/mpich#7805), and a thread blocked in ``Comm.Accept`` holds MPICH's global lock,
stalling every other MPI call of the process (tried: the progress thread froze).

A tag is ``receiver channel (9 bits) << 20 | slot``: each transport of a process gets its own
channel, so two transports of one process (tests) never take each other's messages; slot ``0xFFFFF`` carries
control messages, the others data. MPI has no completion fd: the thread ``Test``s its
requests and sleeps between rounds, backing off to `_IDLE_WAIT_S` while nothing happens (a
connected idle transport costs well under 1 % of a core; an idle peer's first notification
may wait that long). The MPI of the ``mpich`` wheel is not CUDA-aware: CUDA pools are
staged through pinned host buffers.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import mpi4py

mpi4py.rc.thread_level = "multiple"
mpi4py.rc.finalize = False  # a worker killed mid-transfer must still exit; peers may hold requests
import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

from kvtransfer import ucxx_wire as wire  # noqa: E402
from kvtransfer.errors import KVTransferError, ProtocolError  # noqa: E402

log = logging.getLogger(__name__)
T = TypeVar("T")
CTRL_SLOT = 0xFFFFF
WORLD_ENV = "SPLITSERVE_MPI_WORLD"  # set by cluster.mpi_launcher: one id for every rank of the job
_BUSY_WAIT_S, _IDLE_WAIT_S = 50e-6, 0.02
_world: str | None = None
# distinct per transport of this process (ranks differ anyway: a message goes to one rank)
_channels = (1 + (start + i) % 511 for start in [secrets.randbelow(511)] for i in itertools.count())


def tag(channel: int, slot: int) -> int:
    return (channel << 20) | (slot % CTRL_SLOT if slot != CTRL_SLOT else CTRL_SLOT)


def world_id() -> str:
    """An id shared by every rank of this MPI job, different for every other job."""
    global _world
    if _world is None:
        comm = MPI.COMM_WORLD
        if comm.Get_size() == 1:
            _world = uuid.uuid4().hex
        else:  # every rank opens its transport at start-up, so this collective meets its peers
            _world = os.environ.get(WORLD_ENV) or comm.bcast(uuid.uuid4().hex if comm.Get_rank() == 0 else None)
    return _world


@dataclass(frozen=True, eq=False)
class MpiEp:
    comm: Any
    rank: int
    channel: int

    def close(self) -> None:
        """Nothing to tear down: ``COMM_WORLD`` outlives every link."""


@dataclass(eq=False)
class _Group:
    requests: list[Any]
    done: Callable[[str | None], None]
    keep: list[Any] = field(default_factory=list)
    copies: list[tuple[Any, Any]] = field(default_factory=list)  # (host stage, device view) after a recv


class MpiEngine:
    def __init__(self, name: str, on_control: Callable[[dict[str, Any]], None],
                 on_endpoint_error: Callable[[int], None]) -> None:
        MPI.COMM_WORLD.Set_errhandler(MPI.ERRORS_RETURN)
        MPI.COMM_SELF.Set_errhandler(MPI.ERRORS_RETURN)
        self.channel = next(_channels)
        self.world, self.rank = world_id(), MPI.COMM_WORLD.Get_rank()
        self.address: bytes = msgpack.packb({"world": self.world, "rank": self.rank, "channel": self.channel})
        self._on_control = on_control
        self._cuda = False
        self._jobs: deque[Callable[[], None]] = deque()
        self._wake = threading.Event()
        self._groups: list[_Group] = []
        self._ctrl: list[tuple[Any, Any, np.ndarray]] = []  # (comm, request, buffer)
        self._stop = False
        self._listen(MPI.COMM_WORLD)
        self._thread = threading.Thread(target=self._run, name=f"kv-mpi-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ from any thread
    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.append(job)
        self._wake.set()

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        fut: Future[T] = Future()

        def job() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        self.submit(job)
        return fut.result(timeout)

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        self._groups.clear()

    # ------------------------------------------------------------------ on the progress thread
    def pool_device(self, device: torch.device) -> None:
        """CUDA pools are staged on this thread: make the pool's device current here."""
        self._cuda = device.type == "cuda"
        if self._cuda:
            self.call(lambda: torch.cuda.set_device(device))

    def connect(self, address: bytes, link: int, hello: dict[str, Any] | None) -> MpiEp:
        try:
            peer = msgpack.unpackb(address, raw=False)
            world, rank, channel = peer["world"], int(peer["rank"]), int(peer["channel"])
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise ProtocolError(f"malformed MPI address: {exc}") from exc
        if world != self.world:
            raise KVTransferError(
                "the mpi transport connects ranks of one MPI job; this peer runs in another one "
                "(start the workers with `splitserve serve --launcher mpi` or one `mpirun`)"
            )
        return MpiEp(MPI.COMM_WORLD, rank, channel)

    def send_ctrl(self, ep: MpiEp, link: int, msg: dict[str, Any],
                  done: Callable[[str | None], None] | None = None) -> None:
        buf = wire.encode(msg)
        req = ep.comm.Isend([buf, MPI.BYTE], dest=ep.rank, tag=tag(ep.channel, CTRL_SLOT))
        self.track([req], done or (lambda err: err and log.debug("mpi control send failed: %s", err)), [buf])

    def send(self, ep: MpiEp, link: int, slot0: int, views: Sequence[Any]) -> list[Any]:
        bufs = [self._host(v, copy=True) for v in views]
        self._pending_keep = bufs
        return [ep.comm.Isend([b, MPI.BYTE], dest=ep.rank, tag=tag(ep.channel, slot0 + i)) for i, b in enumerate(bufs)]

    def recv(self, ep: MpiEp, link: int, slot0: int, views: Sequence[Any]) -> list[Any]:
        bufs = [self._host(v, copy=False) for v in views]
        self._pending_copies = [(b, v) for b, v in zip(bufs, views) if b is not v]
        self._pending_keep = bufs
        return [ep.comm.Irecv([b, MPI.BYTE], source=ep.rank, tag=tag(self.channel, slot0 + i))
                for i, b in enumerate(bufs)]

    def track(self, requests: list[Any], done: Callable[[str | None], None], keep: list[Any] | None = None) -> None:
        # the staging buffers of the `send`/`recv` whose requests these are (always tracked next)
        group = _Group(requests, done, [*(keep or []), *getattr(self, "_pending_keep", [])],
                       getattr(self, "_pending_copies", []))
        self._pending_keep, self._pending_copies = [], []
        self._groups.append(group)

    # ------------------------------------------------------------------ internals
    def _host(self, view: Any, copy: bool) -> Any:
        """Host memory MPI can use: the view itself, or a pinned stage for a CUDA view."""
        if not isinstance(view, torch.Tensor) or not view.is_cuda:
            return view
        stage = torch.empty(view.numel(), dtype=torch.uint8, pin_memory=True)
        if copy:
            stage.copy_(view)
        return stage.numpy()

    def _listen(self, comm: Any) -> None:
        buf = np.empty(wire.CTRL_BYTES, dtype=np.uint8)
        req = comm.Irecv([buf, MPI.BYTE], source=MPI.ANY_SOURCE, tag=tag(self.channel, CTRL_SLOT))
        self._ctrl.append((comm, req, buf))

    def _run(self) -> None:
        wait = _BUSY_WAIT_S
        while not self._stop:
            while self._jobs:
                self._jobs.popleft()()
            if self._reap():
                wait = _BUSY_WAIT_S
                continue
            if not self._jobs:
                self._wake.wait(wait)
                self._wake.clear()
            wait = min(2 * wait, _IDLE_WAIT_S if not self._groups else 1e-3)

    def _reap(self) -> bool:
        progressed = False
        for i, (comm, req, buf) in enumerate(list(self._ctrl)):
            try:
                if not req.Test():
                    continue
                msg = wire.decode(buf)
            except (MPI.Exception, ProtocolError) as exc:
                log.warning("mpi control receive failed: %s", exc)
                msg = None
            progressed = True
            self._ctrl[i] = (comm, comm.Irecv([buf, MPI.BYTE], source=MPI.ANY_SOURCE,
                                              tag=tag(self.channel, CTRL_SLOT)), buf)
            if msg is not None:
                msg["_via"] = comm
                self._safe(self._on_control, msg)
        for group in list(self._groups):
            try:
                if not MPI.Request.Testall(group.requests):
                    continue
                error = None
            except MPI.Exception as exc:
                error = f"MPI: {exc}"
            progressed = True
            self._groups.remove(group)
            if error is None:
                for stage, view in group.copies:
                    view.copy_(torch.from_numpy(stage))
            self._safe(group.done, error)
        return progressed

    @staticmethod
    def _safe(fn: Callable[[Any], None], arg: Any) -> None:
        try:
            fn(arg)
        except Exception as exc:  # a peer's bad message, or our bug: never the progress thread's end
            log.warning("mpi: %s", exc, exc_info=not isinstance(exc, KVTransferError))

