"""`DecodeGraphs`: the decode forward replayed from CUDA graphs, one per batch size of a ladder.

An eager decode step launches ~400 kernels; at small batch the GPU idles between them, so a
step costs the host's launch time, not the HBM reads. A graph replays the whole forward with
one launch. Graphs are captured once per padded batch size on the persistent buffers of
`engine.input_batch.DecodeInputs` (a batch is padded to the next captured size); prefill and
mixed steps stay eager (their shapes vary every step). On CPU, or with capture off, the same
padded buffers run eagerly, so the padding and the persistent inputs are exercised by CPU tests.

The logits head stays outside the graph: one matmul, and keeping it out spares a ``[B, V]``
float32 buffer per captured size.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence

import torch

from engine.attention import LayerKV
from engine.attention_metadata import AttentionMetadata
from engine.input_batch import DecodeInputs
from engine.models.llama import LlamaForCausalLM
from gpu_kernels import ops

log = logging.getLogger("splitserve.engine")

_LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
_STEP_ABOVE_LADDER = 32


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, then every 32, capped by and ending at
    ``max_num_seqs``: padding wastes at most a third of a batch above 8."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs: must be >= 1, got {max_num_seqs}")
    sizes = [s for s in _LADDER if s < max_num_seqs]
    nxt = _LADDER[-1] + _STEP_ABOVE_LADDER
    while nxt < max_num_seqs:
        sizes.append(nxt)
        nxt += _STEP_ABOVE_LADDER
    return [*sizes, max_num_seqs]


class DecodeGraphs:
    """Runs a padded decode batch: from a captured graph when there is one, else eagerly."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        caches: Sequence[LayerKV],
        inputs: DecodeInputs,
        max_num_seqs: int,
        *,
        pad: bool = True,
        exact_attention: bool = False,
    ) -> None:
        self.model = model
        self.caches = list(caches)
        self.inputs = inputs
        self.sizes = graph_batch_sizes(max_num_seqs) if pad else []
        self.exact_attention = exact_attention
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: object | None = None

    @property
    def num_captured(self) -> int:
        return len(self._graphs)

    def padded_size(self, batch: int) -> int:
        """The captured size a batch of ``batch`` rows runs at (itself when not padding)."""
        for s in self.sizes:
            if s >= batch:
                return s
        return batch

    def capturable(self) -> str | None:
        """Why this model cannot be captured here, or None."""
        if self.inputs.device.type != "cuda":
            return "not a CUDA device"
        if self.exact_attention:
            return "exact_attention is on (its kernels synchronise with the host)"
        if self.model.group.tp_size > 1:
            return "tensor parallelism (collectives are not captured yet)"
        return None

    def capture(self, progress: Callable[[str], None] = log.info) -> None:
        """Capture every size of the ladder, largest first (smaller graphs reuse its memory pool).
        A failed capture leaves decode eager (logged), never a dead worker."""
        why = self.capturable()
        if why is not None or not self.sizes:
            return
        t0 = time.perf_counter()
        progress(f"capturing decode CUDA graphs for {len(self.sizes)} batch sizes (max {self.sizes[-1]})")
        try:
            for n, size in enumerate(reversed(self.sizes), 1):
                self._capture_one(size)
                if n % 4 == 0 or n == len(self.sizes):
                    progress(f"  captured {n}/{len(self.sizes)} (batch {size})")
        except Exception as e:  # a model op that synchronises, an allocator limit, ...
            self._graphs.clear()
            progress(f"decode CUDA graphs: capture failed ({type(e).__name__}: {e}); decode runs eagerly")
            return
        progress(f"captured {len(self._graphs)} decode CUDA graphs in {time.perf_counter() - t0:.1f} s")

    @torch.inference_mode()
    def _capture_one(self, size: int) -> None:
        ids, meta = self.inputs.prepare_dummy(size)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile the kernels and settle the allocator outside the capture
                self._forward(ids, meta)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden = self._forward(ids, meta)
        self._graphs[size] = (graph, hidden)

    def _forward(self, ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        ctx = ops.exact_attention() if self.exact_attention else contextlib.nullcontext()
        with ctx:
            return self.model(ids, meta.positions, self.caches, meta)

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states ``[padded, D]`` of a batch `DecodeInputs.prepare` just wrote."""
        captured = self._graphs.get(int(ids.shape[0]))
        if captured is None:
            return self._forward(ids, meta)
        graph, hidden = captured
        graph.replay()
        return hidden
