"""On a GPU: captured decode graphs, overlap and the KV budget keep greedy tokens unchanged
(float32, so that batch-shape-dependent rounding cannot flip a token) and fill the card."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.tiny_llama import write_tiny_llama

pytestmark = pytest.mark.gpu

PROMPTS = [[5 + i, 17, 33 + i, 9] * (1 + i % 3) for i in range(11)]
PARAMS = [SamplingParams(max_tokens=8 + 5 * (i % 4), temperature=0, ignore_eos=True) for i in range(11)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def _tokens(model: str, **kw: object) -> tuple[list[list[int]], LLM]:
    llm = LLM(model, device="cuda", random_weights=True, max_num_seqs=16, max_model_len=256, **kw)
    outs = llm.generate(PROMPTS, PARAMS)
    return [o.outputs[0].token_ids for o in outs], llm


def test_graphs_are_captured_and_match_eager(tiny: str) -> None:
    on, llm = _tokens(tiny, cuda_graphs=True, overlap_scheduling=False)
    graphs = llm.engine.runner.graphs
    assert graphs.num_captured == len(graphs.sizes) == 5  # 1, 2, 4, 8, 16
    off, llm_off = _tokens(tiny, cuda_graphs=False, overlap_scheduling=False)
    assert llm_off.engine.runner.graphs.num_captured == 0
    assert on == off


def test_overlap_matches_synchronous_on_gpu(tiny: str) -> None:
    on, _ = _tokens(tiny, cuda_graphs=True, overlap_scheduling=True)
    off, _ = _tokens(tiny, cuda_graphs=True, overlap_scheduling=False)
    assert on == off


def test_smollm2_graphs_match_eager(smollm2_path) -> None:
    prompts = ["The capital of France is", "1, 2, 3,", "Once upon a time", "def fib(n):"]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs = []
    for graphs in (True, False):
        llm = LLM(str(smollm2_path), device="cuda", max_num_seqs=8, cuda_graphs=graphs)
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
        del llm
    assert outs[0] == outs[1]


def test_kv_pool_sized_from_free_memory(tiny: str) -> None:
    free, total = torch.cuda.mem_get_info()
    llm = LLM(tiny, device="cuda", random_weights=True, max_num_seqs=16, max_model_len=256,
              gpu_memory_utilization=0.3)
    pool_bytes = llm.engine.layout.total_bytes
    assert pool_bytes <= 0.3 * total
    assert pool_bytes > 0.3 * total - (total - free) - 4 * 2**30  # most of the share, less the reserve
