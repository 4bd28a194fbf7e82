"""`Scheduler.update_from_output` on a real `BlockManager`: several tokens per sequence per step."""

from __future__ import annotations

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence


def test_update_appends_every_accepted_token_and_commits_full_blocks() -> None:
    blocks = BlockManager(8, 16)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), blocks)
    seq = Sequence("r-0", "r", list(range(1, 16)), SamplingParams(max_tokens=8))
    sched.add(seq)
    out = sched.schedule()
    assert [s.num_new_tokens for s in out.scheduled] == [15]
    sched.update_from_output(out, {"r-0": [100, 101, 102]})  # e.g. a token plus two accepted drafts
    assert seq.output_token_ids == [100, 101, 102]
    assert seq.num_computed_tokens == 15
    out = sched.schedule()  # the three new tokens are computed in one step
    assert [s.num_new_tokens for s in out.scheduled] == [3]
    sched.update_from_output(out, {})  # a step that samples nothing appends nothing
    assert seq.num_tokens == 18 and seq.num_computed_tokens == 18
    assert blocks.num_cached_tokens(seq.all_token_ids) == 16  # the full first block is published
