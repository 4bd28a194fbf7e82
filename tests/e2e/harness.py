"""Helpers of the end-to-end tests: a `LocalCluster` per config, worker status, the openai client.

Each cluster is real: a private redis-server, prefill and decode worker processes (started
through the cluster's `Launcher`), the router (uvicorn) in this process. Workers get one torch
thread each (CI has two cores).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai

from cluster.config import ClusterConfig, config_from_dict, load_config
from cluster.launcher import WorkerGroupHandle
from protocol.decode_client import DecodeClient
from protocol.grpc_auth import GrpcTls
from protocol.prefill_client import PrefillClient
from protocol.proto import worker_pb2 as pb
from splitserve.serve import LocalCluster

MODEL = "smollm2"


def make_config(base: str | None = None, **changes: Any) -> ClusterConfig:
    """A config file (or the embedded default) with nested ``changes`` merged in; the router
    always listens on localhost."""
    data = load_config(base).to_dict()
    changes.setdefault("router", {})
    changes["router"] = {"host": "127.0.0.1", **changes["router"]}
    for key, value in changes.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return config_from_dict(data)


@contextmanager
def running_cluster(config: ClusterConfig, log_dir: Path, **kw: Any) -> Iterator[LocalCluster]:
    with LocalCluster(config, router_port=0, startup_timeout_s=300, log_dir=log_dir, **kw) as cluster:
        yield cluster


def client(cluster: LocalCluster, timeout: float = 120.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=timeout)


def async_client(cluster: LocalCluster, timeout: float = 120.0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=timeout)


def status(cluster: LocalCluster, worker: WorkerGroupHandle) -> pb.WorkerStatus:
    cls = DecodeClient if worker.role == "decode" else PrefillClient
    t = cluster.config.tls
    tls = GrpcTls(t.ca_file, t.cert_file, t.key_file) if t.enabled else None
    with cls(worker.address, cluster.token, tls) as c:
        return c.status()


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()


def wait_pools_full(cluster: LocalCluster, timeout: float = 30.0) -> dict[str, pb.WorkerStatus]:
    """Every live worker idle with its whole KV pool free and consistent bookkeeping."""
    deadline = time.monotonic() + timeout
    while True:
        live = [w for w in cluster.workers if w.alive() and w.info is not None]  # not mid-restart
        statuses = {w.worker_id: status(cluster, w) for w in live}
        idle = all(
            s.num_free_blocks == s.num_total_blocks and s.num_running == 0 and s.num_waiting == 0
            and s.num_leases == 0 and not s.integrity_error
            for s in statuses.values()
        )
        if idle:
            return statuses
        if time.monotonic() > deadline:
            raise AssertionError(f"pools not back to full: {statuses}")
        time.sleep(0.1)
