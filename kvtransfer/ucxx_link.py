"""The ucxx backend's progress engine: one UCX worker, one thread that owns it.

Every UCX call of a transport runs on this thread (jobs are queued to it), so the worker
needs no locking and a caller never blocks on the network. The thread progresses the worker
until it has nothing left to do, reaps finished request groups (their callbacks run here),
then *arms* the worker and sleeps in ``poll()`` on the worker's event fd and a wake-up
eventfd: a connected idle transport costs no CPU, and a UCX event or a new job wakes it at
once. The timeout only bounds how stale a missed event can get.

One wildcard tagged receive for the control slot of every link stays posted
(`ucxx_wire.CTRL_MASK`); each control message that lands is handed to ``on_control``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import ucxx._lib.libucxx as ucx
from ucxx._lib.arr import Array

from kvtransfer import ucxx_wire as wire
from kvtransfer.errors import KVTransferError, ProtocolError

log = logging.getLogger(__name__)
T = TypeVar("T")
_IDLE_WAIT_MS = 1000
_BUSY_WAIT_MS = 20  # requests outstanding: look again soon even without an event


@dataclass(eq=False)
class _Group:
    """Requests that finish together (one transfer part): ``done(error or None)`` once all are."""

    requests: list[Any]
    done: Callable[[str | None], None]
    keep: list[Any] = field(default_factory=list)  # buffers UCX reads/writes until completion


class ProgressEngine:
    """A UCX context + worker driven by one sleeping progress thread."""

    def __init__(self, name: str, on_control: Callable[[dict[str, Any]], None],
                 on_endpoint_error: Callable[[int], None]) -> None:
        self._ctx = ucx.UCXContext({"KEEPALIVE_INTERVAL": "1s"}, (ucx.Feature.TAG, ucx.Feature.WAKEUP))
        self._worker = ucx.UCXWorker(self._ctx)
        self._worker.init_blocking_progress_mode()
        self.address: bytes = self._worker.address.tobytes()
        self._on_control, self._on_ep_error = on_control, on_endpoint_error
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._jobs: deque[Callable[[], None]] = deque()
        self._groups: list[_Group] = []
        self._ctrl_buf = np.empty(wire.CTRL_BYTES, dtype=np.uint8)
        self._ctrl_req: Any = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"kv-ucxx-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ from any thread
    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.append(job)
        os.eventfd_write(self._wake, 1)

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run ``fn`` on the progress thread and return its result (or raise its exception)."""
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
        os.eventfd_write(self._wake, 1)
        self._thread.join(timeout=10)
        os.close(self._wake)
        self._groups.clear()
        self._ctrl_req = None

    # ------------------------------------------------------------------ on the progress thread
    def pool_device(self, device: torch.device) -> None:
        """UCX moves device memory from this thread: make the pool's CUDA context current here."""
        if device.type == "cuda":
            self.call(lambda: _make_current(device))

    def connect(self, address: bytes, link: int, hello: dict[str, Any] | None) -> Any:
        """An endpoint to a peer's worker; its failure is reported as ``on_endpoint_error(link)``."""
        ep = ucx.UCXEndpoint.create_from_worker_address(
            self._worker, ucx.UCXAddress.create_from_buffer(address), True
        )
        # deferred: the callback runs inside UCX, where dropping the endpoint's last reference deadlocks
        ep.set_close_callback(lambda: self.submit(lambda: self._on_ep_error(link)))
        return ep

    def send_ctrl(self, ep: Any, link: int, msg: dict[str, Any],
                  done: Callable[[str | None], None] | None = None) -> None:
        buf = wire.encode(msg)
        req = ep.tag_send(Array(buf), ucx.UCXXTag(wire.ctrl_tag(link)))
        self.track([req], done or _log_failure, keep=[buf])

    def send(self, ep: Any, link: int, slot0: int, views: Sequence[Any]) -> list[Any]:
        return [ep.tag_send(Array(v), ucx.UCXXTag(wire.data_tag(link, slot0 + i))) for i, v in enumerate(views)]

    def recv(self, ep: Any, link: int, slot0: int, views: Sequence[Any]) -> list[Any]:
        return [self._worker.tag_recv(Array(v), ucx.UCXXTag(wire.data_tag(link, slot0 + i)))
                for i, v in enumerate(views)]

    def track(self, requests: list[Any], done: Callable[[str | None], None], keep: list[Any] | None = None) -> None:
        self._groups.append(_Group(requests, done, keep or []))

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._worker.epoll_file_descriptor, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        self._post_ctrl()
        while not self._stop:
            while self._jobs:
                self._jobs.popleft()()
            self._worker.progress()
            progressed = self._reap()
            if progressed or self._jobs:
                continue
            if self._worker.arm():
                poller.poll(_BUSY_WAIT_MS if self._groups else _IDLE_WAIT_MS)
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake)

    def _post_ctrl(self) -> None:
        self._ctrl_req = self._worker.tag_recv(
            Array(self._ctrl_buf), ucx.UCXXTag(wire.CTRL_SLOT), ucx.UCXXTagMask(wire.CTRL_MASK)
        )

    def _reap(self) -> bool:
        progressed = False
        while self._ctrl_req is not None and self._ctrl_req.completed:
            progressed = True
            error = _error_of(self._ctrl_req)
            msg = None if error else self._decode_ctrl()
            self._post_ctrl()
            if msg is not None:
                self._dispatch(msg)
        if not self._groups:
            return progressed
        finished = [g for g in self._groups if all(r.completed for r in g.requests)]
        if finished:
            self._groups = [g for g in self._groups if g not in finished]
            for g in finished:
                errors = [e for e in map(_error_of, g.requests) if e]
                self._safe(g.done, errors[0] if errors else None)
        return progressed or bool(finished)

    def _decode_ctrl(self) -> dict[str, Any] | None:
        try:
            return wire.decode(self._ctrl_buf)
        except ProtocolError as exc:
            log.warning("dropped a malformed ucxx control message: %s", exc)
            return None

    def _dispatch(self, msg: dict[str, Any]) -> None:
        self._safe(self._on_control, msg)

    @staticmethod
    def _safe(fn: Callable[[Any], None], arg: Any) -> None:
        try:
            fn(arg)
        except Exception as exc:  # a peer's bad message, or our bug: never the progress thread's end
            log.warning("ucxx: %s", exc, exc_info=not isinstance(exc, KVTransferError))


def _make_current(device: torch.device) -> None:
    torch.cuda.set_device(device)
    torch.cuda.current_stream(device).synchronize()  # a runtime call: the primary context is now current


def _error_of(req: Any) -> str | None:
    try:
        req.check_error()
    except Exception as exc:  # ucxx raises its own UCXError subclasses
        return f"{type(exc).__name__}: {exc}"
    return None


def _log_failure(error: str | None) -> None:
    if error:
        log.debug("ucxx control send failed: %s", error)
