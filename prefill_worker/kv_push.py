"""Layer-wise KV push: which blocks of which sequence go where, as each layer finishes.

For a sequence in a step whose chunk ends at token ``end``, block ``i`` of its prompt is
complete in layer ``L`` once layer ``L`` of this step ran and ``i < end // block_size`` (or
``i`` is the last prompt block and the chunk completes the prompt). Blocks are pushed once,
when complete, from ``next_block`` on: a block split across chunks waits for the later chunk
instead of being written twice (two in-flight writes of one block could land out of order).
Blocks decode already holds (``skip_blocks``) are never written; blocks our own prefix cache
served are written during the first step, like freshly computed ones.

On CUDA the hook runs when layer ``L``'s kernels are *queued*, not done: it records an event
and a pusher thread waits on it before writing, so launches and transfers keep overlapping.
On CPU the forward is synchronous and the hook writes inline.
"""

from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from kvtransfer.base import KVTransport, TransferHandle

log = logging.getLogger(__name__)


@dataclass
class PushTarget:
    """Where one prefill sequence's KV goes; lives as long as the job."""

    request_id: str
    peer: str
    dst_blocks: list[int]
    skip_blocks: int
    next_block: int = -1  # first block not yet written; starts at skip_blocks

    def __post_init__(self) -> None:
        if self.next_block < 0:
            self.next_block = self.skip_blocks


@dataclass
class PushPlan:
    """One sequence's writes in one step."""

    target: PushTarget
    local: list[int]  # our block ids
    remote: list[int]  # decode's block ids, same order
    upto: int  # target.next_block after this step
    completes: bool  # the prompt finishes here: the last layer goes with the notification
    handles: list[TransferHandle] = field(default_factory=list)
    descriptors: int = 0  # copies the transport issued for this plan (coalesced block runs x layers)
    error: str = ""

    def issued(self, handle: TransferHandle) -> None:
        self.handles.append(handle)
        self.descriptors += getattr(handle, "num_descriptors", 0)


def plan_step(target: PushTarget, table: list[int], end: int, prompt_len: int, block_size: int) -> PushPlan:
    completes = end >= prompt_len
    upto = -(-prompt_len // block_size) if completes else end // block_size
    lo = target.next_block
    return PushPlan(target, table[lo:upto], target.dst_blocks[lo:upto], max(upto, lo), completes)


class LayerPusher:
    """The ``on_layer_done`` hook of one forward; ``flush()`` returns once every write is issued."""

    def __init__(self, transport: KVTransport, plans: list[PushPlan], num_layers: int, device: torch.device) -> None:
        self.transport = transport
        self.plans = [p for p in plans if p.local]
        self.last = num_layers - 1
        self.first_write_at = 0.0  # perf_counter of the step's first write; 0 = none yet
        self._queue: queue.Queue[tuple[torch.cuda.Event, int] | None] | None = None
        self._thread: threading.Thread | None = None
        if device.type == "cuda" and self.plans:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._drain, name="kv-pusher", daemon=True)
            self._thread.start()

    def __call__(self, layer: int) -> None:
        if not self.plans:
            return
        if self._queue is None:
            self._push(layer)
            return
        event = torch.cuda.Event()
        event.record()
        self._queue.put((event, layer))

    def flush(self) -> None:
        if self._queue is not None and self._thread is not None:
            self._queue.put(None)
            self._thread.join()

    def _drain(self) -> None:
        assert self._queue is not None
        while (item := self._queue.get()) is not None:
            event, layer = item
            event.synchronize()
            self._push(layer)

    def _push(self, layer: int) -> None:
        for p in self.plans:
            if p.error or (layer == self.last and p.completes):
                continue  # the last layer of a finished prompt waits for its first token
            try:
                if not self.first_write_at:
                    self.first_write_at = time.perf_counter()
                p.issued(self.transport.write_blocks(p.target.peer, p.local, p.remote, layers=[layer]))
            except Exception as e:  # peer gone, bad descriptor: this sequence fails, others go on
                p.error = f"KV write to {p.target.peer} failed: {e}"


class PushStats:
    """What the layer-wise overlap buys, per step: the *tail* (compute done -> last byte landed)
    is all that the transfer adds to TTFT; the whole push window gives the transfer's rate."""

    def __init__(self, window: int = 1024) -> None:
        self.bytes = 0
        self.descriptors = 0
        self.seconds = 0.0
        self._tails: deque[float] = deque(maxlen=window)

    def record(self, nbytes: int, descriptors: int, first_write_at: float, computed_at: float,
               landed_at: float) -> None:
        self.bytes += nbytes
        self.descriptors += descriptors
        self.seconds += landed_at - (first_write_at or computed_at)
        self._tails.append(landed_at - computed_at)

    def tail_ms_p50(self) -> float:
        return 1e3 * statistics.median(self._tails) if self._tails else 0.0
