"""Overlap of host work with the GPU (vLLM v1's async scheduling, SGLang's overlap scheduler).

A synchronous decode step is: schedule -> launch -> wait for the tokens -> stop checks,
detokenisation, outputs. The GPU idles during everything after the wait. With overlap, step
N+1 is scheduled and launched *before* step N's tokens are read: step N's sampled tokens enter
the sequences as `PLACEHOLDER_TOKEN`s (so lengths, positions, seeds and block growth are right),
step N+1 takes its input ids from step N's tokens on the device, and the host reads step N's
tokens (one copy into a pinned buffer, recorded by an event) and does its stop checks and
outputs while the GPU runs step N+1. A sequence that stopped at step N was computed once more
at N+1: that token is dropped.

Only pure decode steps overlap: the engine finishes the step in flight first whenever the next
schedule could admit, chunk or preempt (`overlap_safe`), so eager steps never see a placeholder.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from engine.input_batch import PLACEHOLDER_TOKEN
from engine.sampler import SamplerOutput
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence
from engine.step_output import PendingSample, StepResult


@dataclass
class InFlightStep:
    """A launched decode step whose tokens the host has not read: its sequences hold a
    placeholder at ``slots[seq_id]`` of their output list."""

    sched: SchedulerOutput
    pending: PendingSample
    slots: dict[str, int]

    def resolve(self, seqs: dict[str, Sequence]) -> StepResult:
        """Wait for the tokens, write them over the placeholders, and return the result of
        the sequences still running (a finished or aborted one's extra token is dropped)."""
        result = self.pending.wait()
        out = result.output
        if out is None:
            return result
        keep: list[int] = []
        tokens = out.token_ids.tolist()
        for row, seq_id in enumerate(result.seq_ids):
            seq = seqs.get(seq_id)
            if seq is None or seq.is_finished or seq_id not in self.slots:
                continue
            seq.output_token_ids[self.slots[seq_id]] = tokens[row]
            keep.append(row)
        if len(keep) == len(result.seq_ids):
            return result
        idx = torch.tensor(keep, dtype=torch.int64)
        sub = SamplerOutput(
            out.token_ids[idx], out.logprobs[idx],
            None if out.top_ids is None else out.top_ids[idx],
            None if out.top_logprobs is None else out.top_logprobs[idx],
        )  # fmt: skip
        return StepResult([result.seq_ids[i] for i in keep], sub)


def place_holders(scheduler: Scheduler, sched: SchedulerOutput, pending: PendingSample) -> InFlightStep:
    """Advance the scheduler as if the step's tokens were known (placeholders in their place)."""
    sched.scheduled = [s for s in sched.scheduled if not s.seq.is_finished]
    live = {s.seq.seq_id for s in sched.scheduled}
    slots = {s.seq.seq_id: len(s.seq.output_token_ids) for s in sched.scheduled if s.samples}
    scheduler.update_from_output(sched, {i: [PLACEHOLDER_TOKEN] for i in pending.seq_ids if i in live})
    return InFlightStep(sched, pending, slots)


def overlap_safe(scheduler: Scheduler, num_free_blocks: int) -> bool:
    """True when the next schedule is sure to be every running sequence decoding one token:
    nobody waits to be admitted, nobody is mid-prompt, the token budget covers the batch and
    each sequence can grow by a block without preempting anyone."""
    running: Seq[Sequence] = scheduler.running
    return (
        not scheduler.waiting
        and 0 < len(running) <= min(scheduler.cfg.max_num_batched_tokens, num_free_blocks)
        and all(s.num_tokens - s.num_computed_tokens == 1 for s in running)
    )
