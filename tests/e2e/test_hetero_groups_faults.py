"""A prefill group killed (SIGKILL, every rank) while it writes a decode group's ranks: decode's
leases expire, its blocks come back on every rank (block ids are global in a group), and the
router re-routes the requests (decode then prefills them itself): none is lost.

One cluster: prefill pp=2 -> decode tp=2, tcp, small prefill chunks so prompts are mid-push
when the group dies. The decode lease is the default 10 s: this file takes about 25 s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from splitserve.serve import LocalCluster
from tests.e2e.harness import client, make_config, running_cluster, status, wait_pools_full
from tests.engine.parallel_models import save_tiny_llama_with_tokenizer


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smollm2_path) -> Iterator[LocalCluster]:
    model = save_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny"), Path(smollm2_path))
    config = make_config(
        None, model=str(model), served_model_name="tiny", kvtransfer={"backend": "tcp"},
        prefill={"replicas": 1, "pp": 2, "chunk_size": 16}, decode={"replicas": 1, "tp": 2},
        router={"disagg_threshold": 0},
    )
    with running_cluster(config, tmp_path_factory.mktemp("logs")) as c:
        yield c


def test_killed_prefill_group_mid_push_frees_every_decode_rank(cluster: LocalCluster) -> None:
    api = client(cluster, timeout=180)
    prompts = [f"Request {i}: " + " ".join(f"item {i}-{k} costs {k * i % 97} coins;" for k in range(40))
               for i in range(4)]
    prefill = next(w for w in cluster.workers if w.role == "prefill")
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(api.completions.create, model="tiny", prompt=p, max_tokens=2, temperature=0)
                   for p in prompts]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and status(cluster, prefill).kv_bytes_pushed == 0:
            time.sleep(0.005)
        assert status(cluster, prefill).num_running + status(cluster, prefill).num_waiting > 0, "too late"
        cluster.launcher.kill(prefill)  # every rank of the group, no goodbye
        answers = [f.result(timeout=180) for f in futures]
    assert all(a.choices[0].finish_reason == "length" for a in answers)
    statuses = wait_pools_full(cluster, timeout=60)  # the live decode group: every block back
    assert list(statuses) == ["decode-0"]
