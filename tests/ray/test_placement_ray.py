"""Placement on a simulated 3-node cluster: the Serve options our pool deployments get
(`placement_options`) make every group one STRICT_PACK placement group on one node, and groups
spread across nodes; an impossible config is refused before anything starts.

The replicas here are probes (they report where they run) instead of workers: what is under
test is where Ray and Serve put a group, not the worker inside it."""

from __future__ import annotations

import io
from typing import Any

import pytest
import ray
from ray import serve

from cluster.config import config_from_dict
from cluster.placement import PlacementError, nodes_from_ray, plan_placement
from cluster.redis_server import free_port
from splitserve.ray_deploy import APP_NAME
from splitserve.ray_deploy.app import placement_options
from splitserve.ray_deploy.commands import up
from tests.ray.conftest import FAKE_GPU

PROBE_APP = "placement-probe"


class Probe:
    def __call__(self) -> dict[str, str]:
        ctx = ray.get_runtime_context()
        return {"node": ctx.get_node_id(), "pg": ctx.get_placement_group_id() or ""}


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Ingress:
    def __init__(self, *pools: Any) -> None:
        self.pools = pools

    async def __call__(self) -> list[int]:
        return [0]


def _deploy_probes(config: Any) -> dict[str, Any]:
    plan = plan_placement(config, nodes_from_ray(ray.nodes()), accelerator=FAKE_GPU)
    pools = [serve.deployment(Probe).options(name=p.pool, num_replicas=p.replicas, **placement_options(p)).bind()
             for p in plan.pools.values()]
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()}, proxy_location="HeadOnly")
    serve.run(Ingress.bind(*pools), name=PROBE_APP, route_prefix=None)
    return plan.pools


def _groups(pool: str) -> list[dict[str, str]]:
    """Each replica's placement group: the nodes its bundles sit on, its strategy."""
    table = ray.util.placement_group_table()
    detail = serve.status().applications[PROBE_APP].deployments[pool]
    assert detail.status == "HEALTHY", detail.message
    out = []
    for pg in table.values():
        if pg["state"] == "CREATED" and f"#{pool}#" in pg["name"] and PROBE_APP in pg["name"]:
            out.append({"nodes": set(pg["bundles_to_node_id"].values()), "strategy": pg["strategy"],
                        "bundles": len(pg["bundles"])})
    return out


def test_groups_are_strict_pack_on_one_node_and_spread(ray_cluster: Any, capsys: pytest.CaptureFixture[str]) -> None:
    # 3 nodes x 4 fake GPUs: 2 prefill groups of 2 ranks, 1 decode group of 4 (the ray-8gpu shape)
    config = config_from_dict({"prefill": {"replicas": 2, "tp": 2}, "decode": {"replicas": 1, "tp": 4}})
    try:
        _deploy_probes(config)
        prefill, decode = _groups("prefill"), _groups("decode")
        assert len(prefill) == 2 and len(decode) == 1
        for g in prefill + decode:
            assert len(g["nodes"]) == 1 and g["strategy"] == "STRICT_PACK"
        assert [g["bundles"] for g in prefill + decode] == [2, 2, 4]
        decode_node = next(iter(decode[0]["nodes"]))
        assert all(decode_node not in g["nodes"] for g in prefill)  # the decode group fills its node
        used = set().union(*(g["nodes"] for g in prefill + decode))
        assert len(used) >= 2  # the pools do not share one node
        # while Serve runs with other HTTP options, `up` refuses instead of serving elsewhere
        assert up(None, overrides={"router.port": free_port()}, out=io.StringIO()) == 1
        assert "Serve already runs on this Ray cluster with its proxy on 127.0.0.1:" in capsys.readouterr().err
    finally:
        serve.shutdown()  # Serve's HTTP options are cluster-wide: leave none set for the next test


def test_group_larger_than_any_node_refused_on_the_live_cluster(ray_cluster: Any) -> None:
    config = config_from_dict({"decode": {"tp": 8}})
    with pytest.raises(PlacementError, match=r"decode: .* needs 8 fake_gpu on one node; the largest node has 4"):
        plan_placement(config, nodes_from_ray(ray.nodes()), accelerator=FAKE_GPU)


def test_up_refuses_more_than_the_cluster_holds_before_starting_anything(
        ray_cluster: Any, capsys: pytest.CaptureFixture[str]) -> None:
    rc = up(None, overrides={"decode.replicas": 13}, options={"accelerator": FAKE_GPU}, out=io.StringIO())
    assert rc == 2
    assert "placement: the groups need 14 fake_gpu (prefill 1 x 1 + decode 13 x 1); the cluster has 12" in \
        capsys.readouterr().err
    assert APP_NAME not in serve.status().applications
