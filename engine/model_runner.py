"""`ModelRunner`: turns a scheduled batch into model inputs, runs the model, samples.

It owns the model and the `KVCachePool` of one rank. Inputs are built with tensor ops over
per-sequence ranges; the only Python loop is over sequences, never over tokens of the vocab.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from engine.attention import LayerKV
from engine.attention_metadata import AttentionMetadata
from engine.kv_cache_pool import KVCachePool
from engine.models.llama import LayerHook, LlamaForCausalLM
from engine.sampler import Sampler, SamplerOutput, SamplingBatch
from engine.scheduler import ScheduledSeq
from gpu_kernels import ops


@dataclass
class StepResult:
    """Sampled tokens of the sequences that reached their last known token this step."""

    seq_ids: list[str]
    output: SamplerOutput | None

    def tokens(self) -> dict[str, list[int]]:
        """New tokens per sequence: one each today; a list so speculative decoding can add several."""
        if self.output is None:
            return {}
        return {seq_id: [tok] for seq_id, tok in zip(self.seq_ids, self.output.token_ids.tolist())}


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        pool: KVCachePool,
        eos_token_ids: Seq[int] = (),
        seed: int | None = None,
        exact_attention: bool = False,
    ) -> None:
        self.model = model
        self.exact_attention = exact_attention
        self.pool = pool
        self.device = pool.device
        self.eos_token_ids = tuple(eos_token_ids)
        self.sampler = Sampler(seed)
        self.caches = [LayerKV(pool.layer(i), pool.k_scale, pool.v_scale) for i in range(pool.layout.num_layers)]

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
    def sample(
        self, scheduled: Seq[ScheduledSeq], hidden: torch.Tensor, meta: AttentionMetadata
    ) -> StepResult:
        rows = [i for i, s in enumerate(scheduled) if s.samples]
        if not rows:
            return StepResult([], None)
        last = (meta.query_start_loc[1:] - 1).long()[torch.tensor(rows, device=hidden.device)]
        logits = self.model.logits(hidden[last])
        seqs = [scheduled[i].seq for i in rows]
        batch = SamplingBatch.build(
            [s.params for s in seqs],
            [s.prompt_token_ids for s in seqs],
            [s.output_token_ids for s in seqs],
            eos_token_ids=self.eos_token_ids,
            device=logits.device,
        )
        return StepResult([s.seq_id for s in seqs], self.sampler(logits, batch))

    def execute(
        self, scheduled: Seq[ScheduledSeq], block_tables: Seq[Seq[int]], on_layer_done: LayerHook | None = None
    ) -> StepResult:
        hidden, meta = self.forward(scheduled, block_tables, on_layer_done)
        return self.sample(scheduled, hidden, meta)
