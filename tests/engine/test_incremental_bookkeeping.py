"""Per-step bookkeeping that does not copy the context: committing blocks from an offset
registers the same hashes as committing everything; decode slices only the outputs."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def test_commit_from_offset_equals_full_commit() -> None:
    tokens = list(range(100, 170))  # 4 full blocks of 16 and a partial one
    full, inc = BlockManager(16, 16), BlockManager(16, 16)
    full.allocate("s", tokens[:1])
    inc.allocate("s", tokens[:1])
    assert full.append_slots("s", 70) and inc.append_slots("s", 70)
    full.commit("s", tokens)
    for n in range(17, 71, 7):  # grow as decode does, committing from the last hashed block
        done = inc.num_committed_blocks("s") * 16
        inc.commit("s", tokens[done:n], offset=done)
    assert inc.num_committed_blocks("s") == full.num_committed_blocks("s") == 4
    assert inc._seqs["s"].hashes == full._seqs["s"].hashes
    assert inc.drain_events() and inc.block_table_view("s") == full.block_table("s")


def test_commit_offset_must_be_a_committed_block_boundary() -> None:
    bm = BlockManager(8, 16)
    bm.allocate("s", list(range(40)))
    with pytest.raises(ValueError, match="offset 8"):
        bm.commit("s", list(range(8, 40)), offset=8)
    with pytest.raises(ValueError, match="offset 16"):
        bm.commit("s", list(range(16, 40)), offset=16)  # block 0 is not hashed yet
    with pytest.raises(ValueError, match="only 40 slots"):
        bm.commit("s", list(range(41)))


def test_token_slice_in_decode_reads_only_the_outputs() -> None:
    seq = Sequence("s", "r", [1, 2, 3], SamplingParams())
    seq.output_token_ids = [7, 8, 9]
    assert seq.token_slice(5, 6) == [9]
    assert seq.token_slice(3, 6) == [7, 8, 9]
    assert seq.token_slice(2, 4) == [3, 7]
    assert seq.token_slice(0, 3) == [1, 2, 3]
