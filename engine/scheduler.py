"""`Scheduler`: continuous batching with chunked prefill over one token budget.

Each step: running sequences first (a decode token each, or the next chunk of their prompt),
then waiting ones while the budget and ``max_num_seqs`` allow. When a running sequence cannot
grow, the most recently arrived running sequence is preempted by recompute (blocks freed,
progress reset, back to the front of the queue). The engine calls
``schedule() -> execute -> update_from_output()``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.errors import OutOfBlocksError
from engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # computed this step, starting at seq.num_computed_tokens

    @property
    def start(self) -> int:
        return self.seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """True when this step computes the sequence's last known token, so a new one is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager) -> None:
        self.cfg = cfg
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- queue management -----------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_prefilled(self, seq: Sequence) -> None:
        """Join a sequence whose prompt KV arrived from a prefill worker (blocks already allocated)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        self.blocks.commit(seq.seq_id, seq.token_slice(0, seq.num_computed_tokens))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and release its blocks (idempotent)."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.blocks.free(seq.seq_id)
        elif seq.status is SequenceStatus.REMOTE_PREFILL:
            self.blocks.free(seq.seq_id)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # ---- one step ---------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.cfg.max_num_batched_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._grow_or_preempt(seq, n, out):
                continue
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        if out.preempted:
            return out  # memory is short: admit nobody new this step
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            tokens = seq.all_token_ids
            if not self.blocks.can_allocate(len(tokens), tokens):
                break
            try:
                cached = self.blocks.allocate(seq.seq_id, tokens)
            except OutOfBlocksError:
                break
            self.waiting.popleft()
            seq.num_computed_tokens = cached
            seq.num_cached_tokens = cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - cached, budget)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return out

    def _grow_or_preempt(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Make room for ``n`` more slots, preempting the newest running sequences if needed."""
        while not self.blocks.append_slots(seq.seq_id, seq.num_computed_tokens + n):
            victim = max(self.running, key=lambda s: s.arrival)
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        self.waiting.appendleft(seq)
        out.scheduled = [s for s in out.scheduled if s.seq is not seq]
        out.preempted.append(seq)
        self.num_preemptions += 1

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, list[int]]) -> None:
        """Advance progress, append sampled tokens (several per sequence once speculative decoding
        accepts drafts), and publish newly full blocks to the prefix cache."""
        for s in out.scheduled:
            seq = s.seq
            seq.num_computed_tokens += s.num_new_tokens
            seq.output_token_ids.extend(sampled.get(seq.seq_id, ()))
            self.blocks.commit(seq.seq_id, seq.token_slice(0, seq.num_computed_tokens))
