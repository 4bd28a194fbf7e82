"""SmolLM2 split over real processes gives the single rank's greedy tokens.

SmolLM2-135M has 9 attention heads and 3 KV heads: tp = 3 is its smallest tensor split (tp = 2 is
refused, naming the field); pp = 2 splits its 30 layers 15 / 15.
"""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.distributed.shapes import GroupShapeError

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,"]
GREEDY = SamplingParams(max_tokens=6, temperature=0)
ENGINE = dict(max_num_batched_tokens=64, num_kv_blocks=32)


def _tokens(llm: LLM) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def reference(smollm2_path) -> list[list[int]]:
    return _tokens(LLM(str(smollm2_path), **ENGINE))


@pytest.mark.parametrize("shape", [dict(tensor_parallel_size=3), dict(pipeline_parallel_size=2)], ids=str)
def test_smollm2_group_matches_one_rank(smollm2_path, reference, shape: dict[str, int]) -> None:
    with LLM(str(smollm2_path), **ENGINE, **shape) as llm:
        assert _tokens(llm) == reference


def test_smollm2_refuses_tp2(smollm2_path) -> None:
    with pytest.raises(GroupShapeError, match="tensor_parallel_size = 2 does not divide the model's 9 attention"):
        LLM(str(smollm2_path), tensor_parallel_size=2)
