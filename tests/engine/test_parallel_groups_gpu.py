"""Worker groups on GPUs (NCCL): tp / pp / ep splits give the single GPU's greedy tokens.

Float32 tiny models (as the CPU tests) so the split's summation order cannot flip a token; one
GPU per rank (`rank_device`: rank r on ``cuda:r``). Needs at least two GPUs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.parallel_models import save_tiny_llama, save_tiny_mixtral

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [120, 7, 7, 33, 2, 150, 90, 14, 66, 1, 9, 23], [9, 9, 12]]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _run(path: Path, **parallel: int) -> list[list[int]]:
    if torch.cuda.device_count() < max(1, parallel.get("tensor_parallel_size", 1) * parallel.get(
            "pipeline_parallel_size", 1)):
        pytest.skip("needs one GPU per rank")
    with LLM(str(path), device="cuda", max_num_batched_tokens=16, num_kv_blocks=64, **parallel) as llm:
        return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, list[list[int]]]:
    path = save_tiny_llama(tmp_path_factory.mktemp("llama"))
    return path, _run(path)


@pytest.mark.parametrize("shape", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2),
                                   dict(tensor_parallel_size=2, pipeline_parallel_size=2)], ids=str)
def test_llama_groups_on_gpus_match_one_gpu(llama, shape: dict[str, int]) -> None:
    path, want = llama
    assert _run(path, **shape) == want


def test_mixtral_ep2_on_gpus_matches_one_gpu(tmp_path) -> None:
    path = save_tiny_mixtral(tmp_path / "mixtral")
    want = _run(path)
    assert _run(path, tensor_parallel_size=2, expert_parallel_size=2) == want
    assert _run(path, tensor_parallel_size=2) == want
