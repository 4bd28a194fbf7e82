"""Worker groups over real processes (gloo): tp / pp / ep splits give the single rank's greedy tokens.

`LLM(tensor_parallel_size=..., pipeline_parallel_size=...)` makes this process rank 0 and starts
the followers; each group is started once, runs every prompt of the module, and is closed before
the next one starts (one process group per process at a time).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.distributed.shapes import GroupShapeError
from engine.distributed.world import GroupRankError
from tests.engine.parallel_models import save_tiny_llama, save_tiny_mixtral

PROMPTS = [
    [5, 17, 99, 3, 42, 8, 61],
    [120, 7, 7, 33, 2, 150, 90, 14, 66, 1, 9, 23, 47, 5, 88, 31, 70, 12, 4, 4, 19, 101, 33],
    [9, 9, 12],
    [5, 17, 99, 3, 42, 8, 61, 77, 13],  # shares a prefix with the first: prefix-cache hits
]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=8, temperature=0.8, seed=5, ignore_eos=True)  # sampled on rank 0 alone
# a small token budget: prompts are prefilled in chunks, mixed with other sequences' decodes
ENGINE = dict(max_num_batched_tokens=16, num_kv_blocks=64)


def run(path: Path, **parallel: int) -> list[list[int]]:
    with LLM(str(path), **ENGINE, **parallel) as llm:
        outs = llm.generate(PROMPTS, [GREEDY] * (len(PROMPTS) - 1) + [SEEDED])
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, list[list[int]]]:
    # one KV head: at tp=2 both ranks hold it (replicated); the Mixtral's two KV heads are split
    path = save_tiny_llama(tmp_path_factory.mktemp("llama"), num_key_value_heads=1)
    return path, run(path)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> tuple[Path, list[list[int]]]:
    path = save_tiny_mixtral(tmp_path_factory.mktemp("mixtral"))
    return path, run(path)


@pytest.mark.parametrize("shape", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2),
                                   dict(tensor_parallel_size=2, pipeline_parallel_size=2)], ids=str)
def test_llama_groups_match_one_rank(llama, shape: dict[str, int]) -> None:
    path, want = llama
    assert len({tuple(t) for t in want}) > 3  # the reference is not degenerate
    assert run(path, **shape) == want


@pytest.mark.parametrize("shape", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2),
                                   dict(tensor_parallel_size=2, expert_parallel_size=2)], ids=str)
def test_mixtral_groups_match_one_rank(mixtral, shape: dict[str, int]) -> None:
    path, want = mixtral
    assert run(path, **shape) == want


@pytest.mark.parametrize(("shape", "field"), [
    (dict(tensor_parallel_size=3), "tensor_parallel_size"),   # 4 heads
    (dict(pipeline_parallel_size=5), "pipeline_parallel_size"),  # 4 layers
    (dict(tensor_parallel_size=2, expert_parallel_size=3), "expert_parallel_size"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size"),
])  # fmt: skip
def test_impossible_shapes_are_refused_before_any_process(llama, shape: dict[str, int], field: str) -> None:
    with pytest.raises(GroupShapeError, match=field):
        LLM(str(llama[0]), **shape)


def test_a_dead_follower_fails_the_step_instead_of_hanging(llama) -> None:
    llm = LLM(str(llama[0]), **ENGINE, tensor_parallel_size=2)
    try:
        assert len(llm.generate(PROMPTS[:1], GREEDY)[0].outputs[0].token_ids) == GREEDY.max_tokens
        follower = llm._followers.procs[0]
        follower.kill()
        follower.wait()
        with pytest.raises(GroupRankError, match="a rank of this worker group is gone"):
            llm.generate(PROMPTS[:1], GREEDY)
    finally:
        llm.close()  # no error: the dead rank is accounted for
    assert llm._followers is None
