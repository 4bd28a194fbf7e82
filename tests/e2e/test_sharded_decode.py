"""A sharded decode group behind the router: the official openai client gets the offline tokens.

One cluster for the module: a private redis-server, the router, and one decode group of
tp = 2 (two processes: rank 0 serves gRPC and schedules, rank 1 follows), no prefill workers.
The model is a tiny random Llama over SmolLM2's vocabulary (servable: it has a tokenizer),
so the group is cheap on two cores; the reference is the offline `LLM` on the same folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from splitserve.serve import LocalCluster
from tests.e2e.harness import client, make_config, running_cluster, wait_pools_full
from tests.engine.parallel_models import save_tiny_llama_with_tokenizer

PROMPTS = ["The capital of France is", "One, two, three,", "Water boils at"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory, smollm2_path) -> Path:
    return save_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny"), Path(smollm2_path))


@pytest.fixture(scope="module")
def cluster(model: Path, tmp_path_factory) -> Iterator[LocalCluster]:
    config = make_config(
        None, model=str(model), served_model_name="tiny", kvtransfer={"backend": "tcp"},
        prefill={"replicas": 0}, decode={"replicas": 1, "tp": 2},
    )
    with running_cluster(config, tmp_path_factory.mktemp("logs")) as c:
        yield c


def test_tp2_decode_group_matches_offline_llm(cluster: LocalCluster, model: Path) -> None:
    [group] = cluster.workers
    assert group.spec.world_size == 2 and all(g.alive() for g in cluster.workers)
    api = client(cluster)
    got = [
        api.completions.create(model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                               extra_body={"ignore_eos": True}).choices[0].text
        for p in PROMPTS
    ]
    with LLM(str(model)) as llm:
        want = [o.outputs[0].text for o in llm.generate(PROMPTS, SamplingParams(
            max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))]
    assert got == want
    assert len(set(got)) == len(PROMPTS)  # the random model does not answer everything alike
    wait_pools_full(cluster)  # every block back, bookkeeping consistent
