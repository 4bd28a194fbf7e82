"""`ModelRunner`: turns a scheduled batch into model inputs, runs the model, samples.

It owns the model and the `KVCachePool` of one rank. A step is ``run()`` (the forward, and the
logits of the rows that sample) then ``sample()``. Decode-only steps take the persistent-input
path (`engine.input_batch`, `engine.cuda_graphs`): host work per row is O(1), and on CUDA the
forward is a graph replay. Prefill and mixed steps build their inputs with tensor ops over
per-sequence ranges (`prepare`, `forward`). Rows that sample keep their row across steps
(`BatchRows`), and so do their sampling parameters (`engine.sampling_state`).

Tensor-parallel rank groups override `forward` (eager steps) and `forward_decode` (decode steps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from engine.attention import LayerKV
from engine.attention_metadata import AttentionMetadata
from engine.cuda_graphs import DecodeGraphs
from engine.input_batch import PLACEHOLDER_TOKEN, BatchRows, DecodeInputs, last_token
from engine.kv_cache_pool import KVCachePool
from engine.models.llama import LayerHook, LlamaForCausalLM
from engine.sampler import Sampler
from engine.sampling_state import SamplingState
from engine.scheduler import ScheduledSeq
from engine.sequence import Sequence
from engine.step_output import PendingSample, StepResult
from gpu_kernels import ops

__all__ = ["ForwardOutput", "ModelRunner", "PendingSample", "StepResult"]


@dataclass
class ForwardOutput:
    """What `ModelRunner.run` leaves for `ModelRunner.sample`."""

    seqs: list[Sequence]  # the rows that sample, in row order
    logits: torch.Tensor | None  # [len(seqs), V] float32
    hidden: torch.Tensor  # [T, D] (padded rows included on the decode path)
    meta: AttentionMetadata
    decode_path: bool  # persistent inputs (and a CUDA graph where captured)


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        pool: KVCachePool,
        eos_token_ids: Seq[int] = (),
        seed: int | None = None,
        exact_attention: bool = False,
        *,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        self.model = model
        self.exact_attention = exact_attention
        self.pool = pool
        self.device = pool.device
        self.eos_token_ids = tuple(eos_token_ids)
        self.sampler = Sampler(seed)
        self.caches = [LayerKV(pool.layer(i), pool.k_scale, pool.v_scale) for i in range(pool.layout.num_layers)]
        bs = pool.block_size
        max_blocks = pool.num_blocks if max_model_len is None else min(pool.num_blocks, -(-max_model_len // bs))
        self.rows = BatchRows()
        self.inputs = DecodeInputs(max_num_seqs, max_blocks, bs, self.device)
        self.sampling = SamplingState(max_num_seqs, model.cfg.vocab_size, self.eos_token_ids, self.device)
        # the last sampled tokens, on the device, and the rows they were sampled in
        self._prev_tokens: torch.Tensor | None = None
        self._prev_index: dict[str, int] = {}
        self.graphs = DecodeGraphs(
            model, self.caches, self.inputs, max_num_seqs, pad=cuda_graphs, exact_attention=exact_attention
        )

    def capture_graphs(self) -> None:
        """Capture the decode graphs (CUDA, ``cuda_graphs`` on); after the KV pool exists."""
        self.graphs.capture()

    def prepare(
        self, scheduled: Seq[ScheduledSeq], block_tables: Seq[Seq[int]]
    ) -> tuple[torch.Tensor, AttentionMetadata]:
        """Flatten the batch: token ids, positions, slots and per-sequence block tables."""
        bs = self.pool.block_size
        ids: list[int] = []
        starts: list[int] = []
        q_lens: list[int] = []
        for s in scheduled:
            ids.extend(s.seq.token_slice(s.start, s.start + s.num_new_tokens))
            starts.append(s.start)
            q_lens.append(s.num_new_tokens)
        q_len_t = torch.tensor(q_lens, dtype=torch.int64)
        start_t = torch.tensor(starts, dtype=torch.int64)
        seq_lens = start_t + q_len_t
        qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int64)
        qsl[1:] = torch.cumsum(q_len_t, 0)
        # position of every new token: its sequence's start + offset within the chunk
        seq_of_tok = torch.repeat_interleave(torch.arange(len(q_lens)), q_len_t)
        positions = start_t[seq_of_tok] + (torch.arange(len(ids)) - qsl[:-1][seq_of_tok])
        width = max(len(t) for t in block_tables)
        table = torch.zeros((len(block_tables), width), dtype=torch.int32)
        for i, t in enumerate(block_tables):
            table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        slots = table[seq_of_tok, torch.div(positions, bs, rounding_mode="floor")].long() * bs + positions % bs
        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=qsl.to(torch.int32).to(dev),
            seq_lens=seq_lens.to(torch.int32).to(dev),
            block_tables=table.to(dev),
            slot_mapping=slots.to(dev),
            positions=positions.to(dev),
            max_query_len=max(q_lens),
            max_seq_len=int(seq_lens.max()),
        )
        return torch.tensor(ids, dtype=torch.int64, device=dev), meta

    @torch.inference_mode()
    def forward(
        self, scheduled: Seq[ScheduledSeq], block_tables: Seq[Seq[int]], on_layer_done: LayerHook | None = None
    ) -> tuple[torch.Tensor, AttentionMetadata]:
        """Run the model; returns hidden states ``[T, D]`` and the metadata used."""
        input_ids, meta = self.prepare(scheduled, block_tables)
        # the option turns exact mode on; off, the caller's choice (`ops.exact_attention`) stands
        with ops.exact_attention() if self.exact_attention else contextlib.nullcontext():
            hidden = self.model(input_ids, meta.positions, self.caches, meta, on_layer_done)
        return hidden, meta

    @torch.inference_mode()
    def run(
        self, scheduled: Seq[ScheduledSeq], block_tables: Seq[Seq[int]], on_layer_done: LayerHook | None = None
    ) -> ForwardOutput:
        """The step's forward and the logits of its sampling rows (in row order)."""
        sampling, by_row, seqs = self.assign_rows(scheduled)
        if self._decode_only(scheduled, sampling, on_layer_done):
            hidden, meta = self.forward_decode(seqs, [block_tables[i] for i in by_row])
            logits = self.model.logits(hidden[: len(seqs)])
            return ForwardOutput(seqs, logits, hidden, meta, decode_path=True)
        hidden, meta = self.forward(scheduled, block_tables, on_layer_done)
        logits = None
        if seqs:
            ends, total = [], 0
            for s in scheduled:
                total += s.num_new_tokens
                ends.append(total - 1)
            last = torch.tensor([ends[i] for i in by_row], dtype=torch.int64, device=hidden.device)
            logits = self.model.logits(hidden[last])
        return ForwardOutput(seqs, logits, hidden, meta, decode_path=False)

    def assign_rows(self, scheduled: Seq[ScheduledSeq]) -> tuple[list[int], list[int], list[Sequence]]:
        """Give the sampling sequences their batch rows (persistent inputs and sampling state
        follow the batch's changes): the sampling indices in ``scheduled``, the index of each
        row's sequence, and the sequences in row order."""
        sampling = [i for i, s in enumerate(scheduled) if s.samples]
        changes = self.rows.update([scheduled[i].seq.seq_id for i in sampling])
        by_row = [0] * len(sampling)
        for i in sampling:
            by_row[self.rows.index[scheduled[i].seq.seq_id]] = i
        seqs = [scheduled[i].seq for i in by_row]
        self.inputs.apply(changes)
        self.sampling.apply(changes, seqs)
        return sampling, by_row, seqs

    def _decode_only(self, scheduled: Seq[ScheduledSeq], sampling: list[int], hook: LayerHook | None) -> bool:
        return (
            hook is None
            and 0 < len(scheduled) == len(sampling) <= self.inputs.max_rows
            and all(s.num_new_tokens == 1 for s in scheduled)
        )

    def forward_decode(
        self, seqs: Seq[Sequence], block_tables: Seq[Seq[int]]
    ) -> tuple[torch.Tensor, AttentionMetadata]:
        """One new token per row (``seqs[r]`` in row ``r``): hidden states ``[padded, D]``."""
        padded = self.graphs.padded_size(len(seqs))
        pending = [
            (r, self._prev_index[s.seq_id]) for r, s in enumerate(seqs) if last_token(s) == PLACEHOLDER_TOKEN
        ]
        input_ids, meta = self.inputs.prepare(seqs, block_tables, padded, pending, self._prev_tokens)
        return self.graphs.run(input_ids, meta), meta

    @torch.inference_mode()
    def sample_async(self, fwd: ForwardOutput) -> PendingSample:
        """Sample on the device and start the one device->host copy; the tokens also stay on the
        device for the next decode step's inputs (`engine.async_step`)."""
        ids = [s.seq_id for s in fwd.seqs]
        if not fwd.seqs or fwd.logits is None:
            return PendingSample(ids, None)
        out = self.sampler(fwd.logits, self.sampling.batch(fwd.seqs))
        self.sampling.record(out.token_ids)
        self._prev_tokens, self._prev_index = out.token_ids, self.rows.index
        return PendingSample(ids, out)

    def sample(self, fwd: ForwardOutput) -> StepResult:
        return self.sample_async(fwd).wait()

    def execute(
        self, scheduled: Seq[ScheduledSeq], block_tables: Seq[Seq[int]], on_layer_done: LayerHook | None = None
    ) -> StepResult:
        return self.sample(self.run(scheduled, block_tables, on_layer_done))

