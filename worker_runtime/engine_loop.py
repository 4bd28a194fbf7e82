"""What the prefill and the decode worker's engine threads share: draining their inbox between
steps, and the idle self-check of the block pool that their ``Status`` reports."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from engine.block_manager import BlockIntegrityError

T = TypeVar("T")


@dataclass(frozen=True)
class StopMsg:
    """Put in an engine thread's inbox: the thread fails what it holds and returns."""


def drain_inbox(inbox: queue.Queue[T], timeout: float) -> list[T]:
    """Everything queued now; waits up to ``timeout`` for the first message (0: never waits)."""
    msgs: list[T] = []
    try:
        msgs.append(inbox.get(timeout=timeout) if timeout > 0 else inbox.get_nowait())
        while True:
            msgs.append(inbox.get_nowait())
    except queue.Empty:
        pass
    return msgs


class IdleIntegrityCheck:
    """`BlockManager.check_integrity` at most every ``every_s`` while the worker is idle (the
    only time every block must be accounted for); ``error`` is "" while the last check passed."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s = every_s
        self.error = ""
        self._last = 0.0

    def maybe_run(self, check: Callable[[], None], idle: bool) -> str:
        """``check`` is `LLMEngine.check_integrity`: raises `BlockIntegrityError` on a leak."""
        now = time.monotonic()
        if idle and now - self._last >= self.every_s:
            self._last = now
            try:
                check()
                self.error = ""
            except BlockIntegrityError as e:
                self.error = str(e)
        return self.error
