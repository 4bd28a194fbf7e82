"""GPU twin of `test_hetero_groups`: groups of different tp on CUDA pools, over tcp (host bounce)
and ucxx (device memory), give the offline single-GPU `LLM`'s greedy tokens through the router.

Float32 tiny model (as the CPU test) so a split's summation order cannot flip a token. Needs two
GPUs (ranks take consecutive GPUs, wrapping around: a tiny model shares a GPU fine).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from splitserve.serve import LocalCluster
from tests.e2e.harness import make_config, running_cluster, status, wait_pools_full
from tests.e2e.test_hetero_groups import MAX_TOKENS, PROMPTS, complete
from tests.engine.parallel_models import save_tiny_llama_with_tokenizer

pytestmark = pytest.mark.gpu

CASES = {  # id: (transport, prefill section, decode section)
    "tcp-p-tp1-d-tp2": ("tcp", {"tp": 1}, {"tp": 2}),
    "ucxx-p-tp1-d-tp2": ("ucxx", {"tp": 1}, {"tp": 2}),
    "ucxx-p-tp2-d-tp1": ("ucxx", {"tp": 2}, {"tp": 1}),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory, smollm2_path) -> Path:
    return save_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny"), Path(smollm2_path))


@pytest.fixture(scope="module")
def reference(model: Path) -> list[str]:
    with LLM(str(model), device="cuda") as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    return [o.outputs[0].text for o in outs]


@pytest.fixture(scope="module", params=list(CASES))
def cluster(request, model: Path, tmp_path_factory) -> Iterator[LocalCluster]:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    backend, prefill, decode = CASES[request.param]
    config = make_config(
        None, model=str(model), served_model_name="tiny", device="cuda", dtype="float32",
        kvtransfer={"backend": backend}, prefill={"replicas": 1, "chunk_size": 32, **prefill},
        decode={"replicas": 1, "cuda_graphs": False, **decode}, router={"disagg_threshold": 0},
    )
    with running_cluster(config, tmp_path_factory.mktemp("logs")) as c:
        yield c


def test_gpu_groups_of_different_splits_match_offline_llm(cluster: LocalCluster, reference: list[str]) -> None:
    assert [complete(cluster, p) for p in PROMPTS] == reference
    prefill, decode = (next(w for w in cluster.workers if w.role == role) for role in ("prefill", "decode"))
    assert status(cluster, prefill).kv_bytes_pushed > 0
    assert status(cluster, decode).prompt_tokens_computed == 0
    wait_pools_full(cluster)
