"""`cluster.supervisor`: a real decode worker killed with SIGKILL is restarted by the local
launcher and serves again; a killed embedded redis-server comes back on the same port with the
same password; back-off doubles and the restart limit holds; the config section is validated
with field-named errors."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from cluster.config import ConfigError, config_from_dict, load_config
from cluster.launcher import WorkerGroupSpec
from cluster.local_launcher import LocalProcessLauncher
from cluster.redis_server import EmbeddedRedis
from cluster.supervisor import REDIS, SupervisionPolicy, Supervisor
from protocol.decode_client import DecodeClient
from protocol.worker_spec import WorkerSpec

TOKEN = "supervisor-test-token"


def _wait(cond: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_backoff_doubles_and_is_capped() -> None:
    p = SupervisionPolicy(backoff_s=0.5)
    assert [p.delay(n) for n in range(5)] == [0.0, 1.0, 2.0, 4.0, 8.0]
    assert SupervisionPolicy(backoff_s=100).delay(3) == 30.0


def test_config_section_names_its_fields() -> None:
    base = load_config(None).to_dict()
    assert load_config(None).supervision.max_restarts == 5
    ok = config_from_dict({**base, "supervision": {"max_restarts": 0, "backoff_s": 0.1}})
    assert ok.supervision.max_restarts == 0 and ok.supervision.restart_workers
    for bad, field in (({"max_restarts": -1}, "supervision.max_restarts"), ({"backoff_s": -2}, "supervision.backoff_s"),
                       ({"restart_worker": True}, "supervision.restart_worker")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            config_from_dict({**base, "supervision": bad})


def test_a_killed_redis_server_comes_back_on_the_same_port_and_password() -> None:
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url, socket_timeout=2)
        client.set("k", "v")
        restarts: list[str] = []
        sup = Supervisor(LocalProcessLauncher(TOKEN), [], SupervisionPolicy(backoff_s=0.05), server,
                         on_restart=restarts.append, poll_s=0.05).start()
        try:
            port = server.port
            assert server.pid is not None
            os.kill(server.pid, signal.SIGKILL)
            assert _wait(lambda: restarts == [REDIS] and server.running, timeout=20)
            assert server.port == port
            assert _wait(lambda: _pings(client), timeout=10)  # the same client, same URL: reconnected
            assert client.get("k") is None  # persistence off: a restart is an empty store
            assert sup.restarts(REDIS) == 1
        finally:
            sup.stop()
            client.close()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False


def test_a_killed_worker_is_restarted_then_left_down_past_the_limit(smollm2_path: Path, tmp_path: Path) -> None:
    spec = WorkerSpec(role="decode", model=str(smollm2_path), worker_id="decode-0", transport="tcp",
                      num_kv_blocks=32, num_threads=1)
    with LocalProcessLauncher(TOKEN, log_dir=tmp_path) as launcher:
        [group] = launcher.start([WorkerGroupSpec.single(spec)])
        launcher.wait_ready([group], timeout=300)
        first = group.address
        restarts: list[str] = []
        sup = Supervisor(launcher, [group], SupervisionPolicy(max_restarts=1, backoff_s=0.05),
                         on_restart=restarts.append, poll_s=0.05).start()
        try:
            launcher.kill(group)
            assert _wait(lambda: bool(restarts) and group.info is not None, timeout=300), group.log_tail()
            assert restarts == ["decode-0"] and group.alive()
            assert group.worker_id == "decode-0" and group.address != first  # same id, a new incarnation
            with DecodeClient(group.address, TOKEN) as d:
                assert d.status().num_free_blocks == 32  # really serving again
            launcher.kill(group)  # past max_restarts=1: reported and left down
            time.sleep(0.5)
            assert not group.alive() and restarts == ["decode-0"]
            assert sup.records["decode-0"].given_up
        finally:
            sup.stop()
