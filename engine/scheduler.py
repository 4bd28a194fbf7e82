"""`Scheduler`: continuous batching with chunked prefill over one token budget.

Each step: running sequences first (a decode token each, or the next chunk of their prompt),
then waiting ones while the budget and ``max_num_seqs`` allow. When a running sequence cannot
grow, the most recently arrived running sequence is preempted by recompute (blocks freed,
progress reset, back to the front of the queue). The engine calls
``schedule() -> execute -> update_from_output()``.

Requests whose prompt a peer computes (a KV connector) wait in ``remote_waiting`` until
`admit_remote` allocates their blocks (FIFO, counting them against ``max_num_seqs``), sit in
``remote_prefilling`` while the peer fills them, and join ``running`` with `add_prefilled`.
A finished one whose blocks the peer may still write is ``held`` until `release`.
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
        self.remote_waiting: deque[Sequence] = deque()
        self.remote_prefilling: list[Sequence] = []
        self.held: dict[str, str] = {}  # request id -> seq id whose blocks a peer may still write
        self.num_preemptions = 0

    # ---- queue management -----------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_remote(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING_FOR_REMOTE_KV
        self.remote_waiting.append(seq)

    def admit_remote(self) -> list[Sequence]:
        """Allocate blocks for remote prompts, oldest first, while the batch they will join has
        room and the pool can take them (FIFO: one that does not fit blocks those behind it)."""
        admitted: list[Sequence] = []
        while self.remote_waiting:
            if len(self.running) + len(self.remote_prefilling) >= self.cfg.max_num_seqs:
                break
            seq = self.remote_waiting[0]
            if not self.blocks.can_allocate(seq.num_prompt_tokens, seq.prompt_token_ids):
                break
            try:
                cached = self.blocks.allocate(seq.seq_id, seq.prompt_token_ids)
            except OutOfBlocksError:
                break
            self.remote_waiting.popleft()
            seq.status = SequenceStatus.REMOTE_PREFILL
            seq.num_cached_tokens = cached
            self.remote_prefilling.append(seq)
            admitted.append(seq)
        return admitted

    def add_prefilled(self, seq: Sequence) -> None:
        """Join a sequence whose prompt KV arrived from a prefill worker (blocks already allocated)."""
        self.remote_prefilling.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        self.blocks.commit(seq.seq_id, seq.token_slice(0, seq.num_computed_tokens))

    def has_unfinished(self) -> bool:
        """Sequences a step can run (remote ones wait for their peer, not for a step)."""
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str, hold: bool = False) -> None:
        """Mark finished and release its blocks (idempotent); ``hold`` keeps the blocks of a
        remote prefill allocated until `release` (a peer may still be writing them)."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.blocks.free(seq.seq_id)
        elif seq.status is SequenceStatus.REMOTE_PREFILL:
            self.remote_prefilling.remove(seq)
            if hold:
                self.held[seq.request_id] = seq.seq_id
            else:
                self.blocks.free(seq.seq_id)
        elif seq.status is SequenceStatus.WAITING_FOR_REMOTE_KV:
            self.remote_waiting.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def release(self, request_id: str) -> None:
        """The peer stopped writing a held request's blocks: free them (unknown ids: no-op)."""
        seq_id = self.held.pop(request_id, None)
        if seq_id is not None:
            self.blocks.free(seq_id)

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
        bs = self.blocks.block_size
        for s in out.scheduled:
            seq = s.seq
            seq.num_computed_tokens += s.num_new_tokens
            seq.output_token_ids.extend(sampled.get(seq.seq_id, ()))
            n = seq.num_computed_tokens
            done = self.blocks.num_committed_blocks(seq.seq_id) * bs
            if self.blocks.enable_prefix_caching and n - done >= bs:  # a block filled: hash it
                self.blocks.commit(seq.seq_id, seq.token_slice(done, n), offset=done)
