"""Two prefill workers (deploy/two-prefill.yaml): KV-aware routing and surviving a prefill crash.

``disagg_threshold: 0`` sends every prompt through a prefill worker, so the prefill pool's
choices are visible in the workers' own counters (``prompt_tokens_computed``).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from decode_worker.messages import PrefillTarget
from engine.block_hash import prompt_block_hashes
from engine.sampling_params import SamplingParams
from protocol.decode_client import DecodeClient
from splitserve.serve import LocalCluster
from tests.e2e.harness import MODEL, client, make_config, running_cluster, status, wait_for, wait_pools_full

pytestmark = pytest.mark.slow

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "two-prefill.yaml"
SYSTEM_A = "You are a ship's navigator. " + " ".join(f"Rule {i}: keep a steady bearing of {i * 7} degrees."
                                                       for i in range(24))
SYSTEM_B = "You are a pastry chef. " + " ".join(f"Step {i}: fold the dough {i} times, then rest it."
                                                  for i in range(24))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # short prefill steps: the workers renew a lease between steps, and a CPU core computes a
    # 256-token chunk well within the default 10 s lease
    config = make_config(str(DEPLOY), router={"disagg_threshold": 0}, max_model_len=1024,
                         kv_cache_memory="128MiB", prefill={"chunk_size": 256},
                         supervision={"restart_workers": False})  # the killed worker stays down here
    assert config.prefill.replicas == 2
    with running_cluster(config, tmp_path_factory.mktemp("logs")) as c:
        yield c


@pytest.fixture(scope="module")
def api(cluster: LocalCluster) -> openai.OpenAI:
    return client(cluster)


def _chat_ids(cluster: LocalCluster, system: str, user: str) -> list[int]:
    tok = cluster.app.state.router.backend.tokenizer
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)


def _prefill_on(cluster: LocalCluster, worker_id: str, ids: list[int]) -> None:
    """Run one prompt through a chosen prefill worker, bypassing the router's choice."""
    decode = cluster.pool("decode")[0]
    target = next(w for w in cluster.pool("prefill") if w.worker_id == worker_id)
    with DecodeClient(decode.address, cluster.token) as dc:
        params = SamplingParams(max_tokens=1, temperature=0.0)
        chunks = list(dc.generate(f"warm-{uuid.uuid4().hex[:8]}", ids, params,
                                  prefill=PrefillTarget(worker_id, target.address)))
    assert chunks[-1].finish_reason is not None and chunks[-1].prefill_worker == worker_id


def _computed(cluster: LocalCluster) -> dict[str, int]:
    return {w.worker_id: status(cluster, w).prompt_tokens_computed for w in cluster.pool("prefill")}


def test_shared_system_prompt_goes_to_the_worker_that_cached_it(
    cluster: LocalCluster, api: openai.OpenAI
) -> None:
    # A is cached on prefill-1, B on prefill-0 (a cache-blind tie-break would pick prefill-0 for both)
    homes = {"prefill-1": SYSTEM_A, "prefill-0": SYSTEM_B}
    index = cluster.app.state.router.cluster.index
    bs = cluster.config.block_size
    sys_len = {}
    for worker_id, system in homes.items():
        ids = _chat_ids(cluster, system, "Hello.")
        _prefill_on(cluster, worker_id, ids)
        shared = _common_prefix(ids, _chat_ids(cluster, system, "Something else entirely?"))
        sys_len[worker_id] = shared
        hashes = prompt_block_hashes(ids[:shared], bs)
        assert wait_for(lambda: index.overlap_blocks(worker_id, hashes) == len(hashes), timeout=5)  # noqa: B023
    before = _computed(cluster)
    questions = ["What bearing now?", "How long should it rest?", "Any advice?", "Why?"]
    jobs = [(w, q) for w in homes for q in questions]

    def ask(job: tuple[str, str]) -> openai.types.chat.ChatCompletion:
        worker_id, q = job
        msgs = [{"role": "system", "content": homes[worker_id]}, {"role": "user", "content": q}]
        return api.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0)

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    after = _computed(cluster)
    for worker_id in homes:
        # each request computed only its own question: far less than one system prompt each
        delta = after[worker_id] - before[worker_id]
        assert 0 < delta < len(questions) * 2 * bs, (worker_id, delta, before, after)
        assert delta < sys_len[worker_id]
    for (worker_id, _), r in zip(jobs, answers):
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens_details.cached_tokens >= sys_len[worker_id] - bs


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _retries(cluster: LocalCluster) -> float:
    text = httpx.get(f"{cluster.url}/metrics", timeout=10).text
    found = re.findall(r'^splitserve_route_retries_total\{failed_pool="prefill"\} (\S+)$', text, re.M)
    return float(found[0]) if found else 0.0


def test_kill_9_of_a_prefill_worker_mid_load_loses_no_request(
    cluster: LocalCluster, api: openai.OpenAI
) -> None:
    prompts = [f"Request {i}. " + " ".join(f"item {i}-{k} costs {k * i % 97} coins;" for k in range(14))
               + " What is the total?" for i in range(10)]
    retries_before = _retries(cluster)

    def ask(prompt: str) -> openai.types.Completion:
        return api.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)

    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(ask, p) for p in prompts]
        victim = None
        deadline = time.monotonic() + 30
        while victim is None and time.monotonic() < deadline:
            for w in cluster.pool("prefill"):
                s = status(cluster, w)
                if s.num_running + s.num_waiting > 0:
                    victim = w
                    break
        assert victim is not None, "no prefill worker ever had work"
        cluster.launcher.kill(victim)  # SIGKILL: no goodbye, no deregistration
        answers = [f.result(timeout=180) for f in futures]
    assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
    assert _retries(cluster) > retries_before  # the victim's requests were re-routed, not lost
    live = cluster.app.state.router.cluster
    assert wait_for(lambda: victim.worker_id not in {w.worker_id for w in live.workers()}, timeout=15)
    # the re-routed requests produced the same tokens as a calm run
    again = [ask(p) for p in prompts[:4]]
    assert [a.choices[0].text for a in again] == [a.choices[0].text for a in answers[:4]]


def test_pools_back_to_full_after_load(cluster: LocalCluster) -> None:
    statuses = wait_pools_full(cluster)
    assert len(statuses) == 2  # the surviving prefill worker and the decode worker
