"""One request through the router per KV transport: `splitserve serve` with
``kvtransfer.backend`` set to each backend that runs on a CPU, the official openai client, and
the same greedy tokens as the offline `LLM`.

``disagg_threshold: 0`` sends every prompt through the prefill worker, so the KV of each
answer crossed the transport under test (the prefill worker's counter shows it ran the prompt).
One cluster per backend (module-scoped, parametrized): a few short prompts each. ``mpi``
connects ranks of one MPI job, so its cluster runs through the mpi launcher (one ``mpiexec``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.config import load_config
from engine.sampling_params import SamplingParams
from splitserve.serve import LocalCluster, launcher_factory
from tests.e2e.harness import MODEL, client, make_config, running_cluster, status, wait_pools_full

pytestmark = pytest.mark.slow

CPU_BACKENDS = ["nixl", "tcp", "ucxx", "mpi"]
PROMPTS = [
    "Here is a short story about a lighthouse keeper who found a bottle on the beach. It said",
    " ".join(f"Item {i} costs {3 * i} dollars." for i in range(12)) + " The total of items 1 and 2 is",
]


@pytest.fixture(scope="module", params=CPU_BACKENDS)
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    backend = request.param
    config = make_config(None, kvtransfer={"backend": backend}, router={"disagg_threshold": 0})
    logs = tmp_path_factory.mktemp(f"logs-{backend}")
    launcher = launcher_factory("mpi" if backend == "mpi" else "local", logs)
    with running_cluster(config, logs, make_launcher=launcher) as c:
        yield c


@pytest.fixture(scope="module")
def reference(smollm2_path: Path) -> Any:
    from engine.llm import LLM

    base = load_config(None)
    return LLM(smollm2_path, block_size=base.block_size, max_model_len=base.max_model_len)


def test_disaggregated_tokens_equal_offline_llm(cluster: LocalCluster, reference: Any) -> None:
    api = client(cluster)
    computed = lambda: sum(status(cluster, w).prompt_tokens_computed for w in cluster.pool("prefill"))  # noqa: E731
    params = SamplingParams(max_tokens=8, temperature=0.0)
    for prompt in PROMPTS:
        ids = reference.tokenizer.encode(prompt)
        assert len(ids) > cluster.config.block_size  # at least one whole block crosses the transport
        expected = reference.generate([ids], params)[0]
        before = computed()
        r = api.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
        assert r.choices[0].text == expected.text, cluster.config.kvtransfer.backend
        assert r.usage.completion_tokens == len(expected.token_ids)
        assert computed() - before >= len(ids) - cluster.config.block_size  # the prefill worker ran it
    wait_pools_full(cluster)
