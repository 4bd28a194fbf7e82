"""Prefill and decode groups of different tp/pp behind the router: every prefill rank writes each
decode rank its heads and layers (tcp), and the official openai client gets the offline tokens.

One cluster per pairing (module-scoped, parametrized): a private redis-server, one prefill worker
group, one decode worker group, the router. The model is a tiny random Llama over SmolLM2's
vocabulary (4 heads, 2 KV heads, 4 layers); the reference is the offline `LLM` on the same folder.
Prompts are longer than one block (16 tokens) so several blocks and a partial one move.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from splitserve.serve import LocalCluster
from tests.e2e.harness import client, make_config, running_cluster, status, wait_pools_full
from tests.engine.parallel_models import offline_greedy_texts, save_tiny_llama_with_tokenizer

PROMPTS = ["The capital of France is a city that many people visit every year because",
           "One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve,"]
MAX_TOKENS = 6
PAIRINGS = {  # id: (prefill section, decode section)
    "p-tp1-d-tp2": ({"tp": 1}, {"tp": 2}),
    "p-tp2-d-tp1": ({"tp": 2}, {"tp": 1}),
    "p-pp2-d-tp2": ({"pp": 2}, {"tp": 2}),
    "p-tp2-d-pp2": ({"tp": 2}, {"pp": 2}),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory, smollm2_path) -> Path:
    return save_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny"), Path(smollm2_path))


@pytest.fixture(scope="module")
def reference(model: Path) -> list[str]:
    return offline_greedy_texts(model, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module", params=list(PAIRINGS))
def cluster(request, model: Path, tmp_path_factory) -> Iterator[LocalCluster]:
    prefill, decode = PAIRINGS[request.param]
    config = make_config(
        None, model=str(model), served_model_name="tiny", kvtransfer={"backend": "tcp"},
        prefill={"replicas": 1, "chunk_size": 32, **prefill}, decode={"replicas": 1, **decode},
        router={"disagg_threshold": 0},
    )
    with running_cluster(config, tmp_path_factory.mktemp("logs")) as c:
        yield c


def complete(cluster: LocalCluster, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    return client(cluster).completions.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True},
    ).choices[0].text


def test_groups_of_different_splits_match_offline_llm(cluster: LocalCluster, reference: list[str]) -> None:
    assert all(g.alive() for g in cluster.workers)
    assert [complete(cluster, p) for p in PROMPTS] == reference
    assert len(set(reference)) == len(PROMPTS)  # the random model does not answer everything alike
    prefill, decode = (next(w for w in cluster.workers if w.role == role) for role in ("prefill", "decode"))
    assert status(cluster, prefill).kv_bytes_pushed > 0  # the prompts' KV came from the prefill group
    assert status(cluster, decode).prompt_tokens_computed == 0  # ...and decode did not recompute it
    key = json.loads(status(cluster, decode).compat_key)  # the group's split is part of its key
    assert (key["group.tp"], key["group.pp"]) == (cluster.config.decode.tp, cluster.config.decode.pp)
    wait_pools_full(cluster)  # every block back on both groups (block ids are global in a group)


def test_abort_mid_transfer_leaves_every_pool_full(cluster: LocalCluster) -> None:
    """A client that leaves while its prompt is prefilled and pushed: both groups free its blocks."""
    prefill = next(w for w in cluster.workers if w.role == "prefill")
    pushed = status(cluster, prefill).kv_bytes_pushed
    api = client(cluster, timeout=0.1)
    long_prompt = " ".join(["word"] * 900)  # ~30 chunks of 32 tokens: the client leaves mid-way
    left = 0
    for _ in range(3):
        try:
            api.completions.create(model="tiny", prompt=long_prompt, max_tokens=4, temperature=0)
        except openai.APITimeoutError:
            left += 1  # the router aborts the request on both groups
    assert left, "every request finished within the client's timeout: nothing was aborted"
    wait_pools_full(cluster, timeout=60)
    assert status(cluster, prefill).kv_bytes_pushed > pushed  # the aborted prompts had started moving
    assert complete(cluster, PROMPTS[0], 2)  # the groups still serve after the aborts
