"""`splitserve up` on real Ray (the session's 3-node cluster): the embedded model with 1 prefill
and 1 decode replica behind 2 router replicas (Serve's proxy in front), with the official `openai`
client; then live scaling and a killed worker under continuous load, then `down`.

The tests run in file order on one deployment (module fixture): scale to 2 decode replicas,
kill one of them, scale back to 1, take everything down."""

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
from ray import serve
from ray.util.state import list_actors

from engine import SamplingParams
from splitserve.ray_deploy import APP_NAME
from splitserve.ray_deploy.commands import _details, down, scale, status, up
from tests.ray.load import ContinuousLoad

CONFIG = "deploy/local.yaml"  # tcp transport, embedded Redis
OPTIONS = {"router_replicas": 2, "health_check_period_s": 1.0, "health_check_timeout_s": 10.0, "drain_timeout_s": 60.0,
           "proxy_location": "HeadOnly"}
QUESTION = "What is the capital of France?"


def _free_port() -> int:
    from cluster.redis_server import free_port

    return free_port()


@pytest.fixture(scope="module")
def deployed(ray_cluster: Any) -> Iterator[str]:
    port = _free_port()
    assert up(CONFIG, overrides={"router.port": port}, options=OPTIONS, out=io.StringIO()) == 0
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        down(out=io.StringIO())


@pytest.fixture(scope="module")
def api(deployed: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=deployed, api_key="unused", max_retries=0, timeout=120)


def _replicas(pool: str) -> list[dict[str, Any]]:
    return _details()["applications"][APP_NAME]["deployments"][pool]["replicas"]


def _worker_pid(replica: dict[str, Any]) -> int:
    """The worker process that a replica actor started (its child running ``-m <role>_worker``)."""
    children = psutil.Process(replica["pid"]).children()
    return next(c.pid for c in children if any(a.endswith("_worker") for a in c.cmdline()))


def _wait_replicas(pool: str, n: int, timeout: float = 180.0, gone: str | None = None) -> list[dict[str, Any]]:
    """Until ``pool`` has exactly ``n`` replicas, all RUNNING (a stopping one has finished), and
    replica ``gone`` is not among them."""
    deadline = time.monotonic() + timeout
    while True:
        reps = _replicas(pool)
        ids = {r["replica_id"] for r in reps}
        if len(reps) == n and all(r["state"] == "RUNNING" for r in reps) and gone not in ids:
            return reps
        assert time.monotonic() < deadline, f"{pool}: {[(r['replica_id'], r['state']) for r in reps]}"
        time.sleep(0.5)


def test_chat_through_the_router_equals_the_offline_engine(api: openai.OpenAI, smollm2_path: Path) -> None:
    from engine.llm import LLM

    r = api.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                    max_tokens=16, temperature=0)
    ref = LLM(smollm2_path, block_size=16, max_model_len=2048).generate(
        [[{"role": "user", "content": QUESTION}]], SamplingParams(max_tokens=16, temperature=0.0))[0]
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.content == ref.text
    assert r.usage.completion_tokens == len(ref.token_ids)
    stream = api.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                         max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ref.text


def test_status_lists_every_replica(deployed: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert status() == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["pool", "replica", "node", "GPUs", "state", "queue", "KV", "use", "tokens/s"]
    rows = [line.split() for line in out[1:-1]]
    assert sorted(r[0] for r in rows) == ["decode", "prefill"]
    assert all(r[4] == "RUNNING" and r[5] != "-" for r in rows)  # the worker answered its Status
    assert out[-1] == "router replicas: 2"  # the ingress runs several replicas


def test_scale_decode_to_two_under_load(deployed: str) -> None:
    with ContinuousLoad(deployed) as load:
        load.wait_for_more(2)
        assert scale(None, 2, out=io.StringIO()) == 0
        _wait_replicas("decode", 2)
        load.wait_for_more(6)
    assert load.failures == []


def test_killed_worker_is_replaced_and_traffic_continues(deployed: str) -> None:
    victim = _replicas("decode")[0]
    with ContinuousLoad(deployed, threads=2) as load:
        load.wait_for_more(2)
        os.kill(_worker_pid(victim), signal.SIGKILL)
        _wait_replicas("decode", 2, gone=victim["replica_id"])  # Serve replaced the replica
        load.wait_for_more(6)
    # only the requests streaming on the killed worker may fail (at most one per client thread)
    assert len(load.failures) <= 2, load.failures


def test_scale_back_to_one_drains_without_failures(deployed: str) -> None:
    with ContinuousLoad(deployed) as load:
        load.wait_for_more(2)
        assert scale(None, 1, out=io.StringIO()) == 0
        _wait_replicas("decode", 1)  # the removed replica drained and stopped
        load.wait_for_more(4)
    assert load.failures == []


def test_down_leaves_no_process_or_actor_of_ours(deployed: str) -> None:
    ours = [a for a in list_actors(filters=[("state", "=", "ALIVE")])
            if "splitserve" in a.class_name or a.class_name == "ControlPlaneActor"]
    pids = [p.pid for a in ours for p in psutil.Process(a.pid).children(recursive=True)]
    assert len(pids) >= 3  # two workers and the redis-server
    assert down(out=io.StringIO()) == 0
    assert APP_NAME not in serve.status().applications if serve.status() else True
    left = [a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")])
            if "splitserve" in a.class_name or a.class_name == "ControlPlaneActor"]
    assert left == []
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() < deadline, [p for p in pids if psutil.pid_exists(p)]
        time.sleep(0.2)
