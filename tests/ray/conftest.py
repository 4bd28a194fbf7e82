"""Ray, started once per test session: a simulated 3-node cluster (`ray.cluster_utils.Cluster`,
three raylets on this machine), each node declaring 4 units of a GPU-like custom resource
(``fake_gpu``) and 4 logical CPUs; the machine's real GPUs, if any, go to the head node.
Placement tests reserve ``fake_gpu``; the serving tests run CPU workers of the embedded model
on the same cluster."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray")

FAKE_GPU = "fake_gpu"
NODES = 3
PER_NODE = {"num_cpus": 4, "resources": {FAKE_GPU: 4}}


def _start_cluster(cluster_cls: Any, num_gpus: int, attempts: int = 2) -> Any:
    """The simulated cluster; a second try where a raylet missed its start-up deadline (three
    raylets starting at once on a loaded 2-core machine can)."""
    for attempt in range(attempts):
        cluster = cluster_cls()
        try:
            # the first node is the head; the real GPUs (if any) are its alone: the nodes share one machine
            cluster.add_node(**PER_NODE, num_gpus=num_gpus)
            for _ in range(NODES - 1):
                cluster.add_node(**PER_NODE, num_gpus=0)
            cluster.wait_for_nodes()
            return cluster
        except Exception:
            cluster.shutdown()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    import torch
    from ray.cluster_utils import Cluster

    from splitserve.ray_deploy import NAMESPACE

    cluster = _start_cluster(Cluster, torch.cuda.device_count())
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    try:
        yield cluster
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
