"""The step plan: everything a follower rank needs to run rank 0's step, sent once per step.

Rank 0 flattens its scheduled batch (`ModelRunner.prepare`) into micro-batches of CPU tensors and
broadcasts them; followers rebuild the same `AttentionMetadata` and run the same forward. No
scheduler, sequence or sampler state crosses: followers only need shapes, slots and block tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from engine.attention_metadata import AttentionMetadata


@dataclass
class MicroBatch:
    """One forward's flattened inputs; ``sample_rows`` are the token rows whose logits rank 0 samples."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    max_query_len: int
    max_seq_len: int
    sample_rows: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def of(cls, input_ids: torch.Tensor, meta: AttentionMetadata, sample_rows: torch.Tensor) -> MicroBatch:
        return cls(
            input_ids.cpu(), meta.positions.cpu(), meta.query_start_loc.cpu(), meta.seq_lens.cpu(),
            meta.block_tables.cpu(), meta.slot_mapping.cpu(), meta.max_query_len, meta.max_seq_len,
            sample_rows.cpu(),
        )

    def on(self, device: torch.device) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor]:
        """``(input_ids, metadata, sample_rows)`` on ``device``."""
        meta = AttentionMetadata(
            query_start_loc=self.query_start_loc.to(device),
            seq_lens=self.seq_lens.to(device),
            block_tables=self.block_tables.to(device),
            slot_mapping=self.slot_mapping.to(device),
            positions=self.positions.to(device),
            max_query_len=self.max_query_len,
            max_seq_len=self.max_seq_len,
        )
        return self.input_ids.to(device), meta, self.sample_rows.to(device)


@dataclass
class StepPlan:
    """One step of the group; ``stop`` tells followers to leave their loop. ``kv``: with micro-batches,
    this step's KV pushes to another group (each rank writes its slices); without, a KV command
    (open the rank's transport, add peers) that every follower applies and answers (`gather_replies`)."""

    micro_batches: list[MicroBatch] = field(default_factory=list)
    exact_attention: bool = False
    stop: bool = False
    kv: Any = None


def broadcast_plan(plan: StepPlan | None, control: object) -> StepPlan:
    """Rank 0 passes its plan, followers pass None and get it: one broadcast per step."""
    box: list[StepPlan | None] = [plan]
    dist.broadcast_object_list(box, src=0, group=control)
    got = box[0]
    assert isinstance(got, StepPlan)
    return got


def gather_replies(reply: Any, control: object) -> list[Any]:
    """Every rank's ``reply`` to a KV command or push, in rank order on rank 0 (others get [])."""
    rank, size = dist.get_rank(), dist.get_world_size()
    out: list[Any] | None = [None] * size if rank == 0 else None
    dist.gather_object(reply, out, dst=0, group=control)
    return out or []
