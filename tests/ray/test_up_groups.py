"""`splitserve up` of a sharded decode pool on real Ray (the session's 3-node cluster): one replica
is a tp = 2 group, rank 0 in the replica actor (bundle 0), rank 1 in a `FollowerRank` actor on
bundle 1 of the same placement group. The official `openai` client through Serve's proxy gets
the offline `engine.LLM`'s greedy tokens; a `kill -9` of either rank or of the replica actor takes
the whole group down and Serve replaces it; `down` leaves no process of ours, followers included.

The model is a tiny random Llama over SmolLM2's vocabulary (cheap on two cores). The tests run
in file order on one deployment (module fixture)."""

from __future__ import annotations

import io
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest
from ray.util.state import list_actors

from splitserve.ray_deploy.commands import down, up
from tests.engine.parallel_models import offline_greedy_texts, save_tiny_llama_with_tokenizer
from tests.ray.test_up import _replicas, _wait_replicas

PROMPTS = ["The capital of France is", "One, two, three,", "Water boils at"]
MAX_TOKENS = 8
OPTIONS = {"health_check_period_s": 1.0, "health_check_timeout_s": 10.0, "drain_timeout_s": 10.0,
           "proxy_location": "HeadOnly"}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Path:
    return save_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny"), Path(smollm2_path))


@pytest.fixture(scope="module")
def reference(model: Path) -> list[str]:
    return offline_greedy_texts(model, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def api(ray_cluster: Any, model: Path) -> Iterator[openai.OpenAI]:
    from cluster.redis_server import free_port

    port = free_port()
    overrides = {"router.port": port, "model": str(model), "served_model_name": "tiny", "prefill.replicas": 0,
                 "decode.tp": 2, "kv_cache_memory": "64MiB"}
    assert up("deploy/local.yaml", overrides=overrides, options=OPTIONS, out=io.StringIO()) == 0
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        down(out=io.StringIO())


def _complete(api: openai.OpenAI) -> list[str]:
    return [api.completions.create(model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                   extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS]


def _complete_when_routable(api: openai.OpenAI, timeout: float = 60.0) -> list[str]:
    """`_complete` once the router sees the new group (its registry view lags a replacement)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _complete(api)
        except openai.APIStatusError:
            assert time.monotonic() < deadline
            time.sleep(0.5)


def _follower_actors() -> list[Any]:
    return list_actors(filters=[("class_name", "=", "FollowerRank"), ("state", "=", "ALIVE")])


def _group_pids() -> dict[str, Any]:
    """The running group's processes: its replica actor, rank 0 (the worker, the replica's child),
    rank 1's actor and rank 1 (the follower process, that actor's child)."""
    [replica] = _replicas("decode")
    [follower] = _follower_actors()
    rank0 = next(c for c in psutil.Process(replica["pid"]).children() if "decode_worker" in c.cmdline())
    rank1 = next(c for c in psutil.Process(follower.pid).children() if "worker_runtime.group" in c.cmdline())
    assert follower.node_id == replica["node_id"]  # STRICT_PACK: the group shares a node
    return {"replica": replica["pid"], "rank0": rank0.pid, "follower_actor": follower.pid, "rank1": rank1.pid,
            "replica_id": replica["replica_id"]}


def _wait_gone(pids: list[int], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while alive := [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]:
        assert time.monotonic() < deadline, f"still running: {alive}"
        time.sleep(0.2)


def test_replica_checks_the_group_shape_on_its_node_naming_the_field(model: Path) -> None:
    from cluster.config import ConfigError
    from protocol.worker_spec import WorkerSpec
    from splitserve.ray_deploy.worker_replica import _check_shape

    spec = WorkerSpec(role="decode", model=str(model), tp_size=2, pp_size=3)
    with pytest.raises(ConfigError, match=r"decode.pp = 3 stages exceed the model's 2 layers"):
        _check_shape(spec)
    _check_shape(spec.replace(pp_size=2))


def test_tp2_group_through_serve_equals_the_offline_engine(api: openai.OpenAI, reference: list[str]) -> None:
    got = _complete(api)
    assert got == reference
    assert len(set(got)) == len(PROMPTS)  # the random model does not answer everything alike
    pids = _group_pids()
    assert len({pids["replica"], pids["rank0"], pids["follower_actor"], pids["rank1"]}) == 4


@pytest.mark.parametrize("victim", ["rank1", "rank0", "replica"])
def test_killed_rank_takes_the_group_down_and_serve_replaces_it(
        api: openai.OpenAI, reference: list[str], victim: str) -> None:
    before = _group_pids()
    os.kill(before[victim], signal.SIGKILL)
    _wait_replicas("decode", 1, gone=before["replica_id"])
    _wait_gone([before["rank0"], before["rank1"], before["follower_actor"]])  # nothing of the dead group left
    assert _complete_when_routable(api) == reference
    after = _group_pids()
    assert after["rank0"] != before["rank0"] and after["rank1"] != before["rank1"]


def test_down_leaves_no_process_of_ours_followers_included(api: openai.OpenAI) -> None:
    pids = _group_pids()
    assert down(out=io.StringIO()) == 0
    assert _follower_actors() == []
    _wait_gone([pids["replica"], pids["rank0"], pids["follower_actor"], pids["rank1"]], timeout=30.0)
