"""`cluster.placement`: pure planning (no Ray), against made-up nodes."""

from __future__ import annotations

import pytest

from cluster.config import config_from_dict, load_config
from cluster.placement import NodeResources, PlacementError, nodes_from_ray, plan_placement


def _nodes(*gpus: int) -> list[NodeResources]:
    return [NodeResources(f"n{i}", {"GPU": g, "CPU": 32}) for i, g in enumerate(gpus)]


def _cuda(**pools: dict) -> object:
    return config_from_dict({"device": "cuda", "dtype": "bfloat16", **pools})


def test_ray_8gpu_example_fits_two_4gpu_nodes_one_group_per_node_slot() -> None:
    plan = plan_placement(load_config("deploy/ray-8gpu.yaml"), _nodes(4, 4))
    assert plan.pools["prefill"].bundles == ({"GPU": 1.0, "CPU": 1.0},) * 2
    assert plan.pools["decode"].world_size == 4 and plan.pools["decode"].strategy == "STRICT_PACK"
    decode_node = plan.assignments[("decode", 0)]
    assert set(plan.nodes_of("prefill")) == {"n0", "n1"} - {decode_node}  # the other node holds both


def test_groups_spread_across_nodes() -> None:
    plan = plan_placement(_cuda(prefill={"replicas": 3}, decode={"replicas": 3}), _nodes(8, 8, 8))
    assert sorted(plan.nodes_of("prefill")) == ["n0", "n1", "n2"]
    assert sorted(plan.nodes_of("decode")) == ["n0", "n1", "n2"]


def test_group_larger_than_any_node_is_refused_naming_pool_and_numbers() -> None:
    with pytest.raises(PlacementError, match=r"decode: a group of tp x pp = 8 ranks needs 8 GPU on one node; "
                                             r"the largest node has 4"):
        plan_placement(_cuda(decode={"tp": 8}), _nodes(4, 4, 4))


def test_more_gpus_than_exist_is_refused() -> None:
    with pytest.raises(PlacementError, match=r"need 10 GPU \(prefill 2 x 2 \+ decode 3 x 2\); the cluster has 8"):
        plan_placement(_cuda(prefill={"replicas": 2, "tp": 2}, decode={"replicas": 3, "tp": 2}), _nodes(4, 4))


def test_fragmentation_is_refused() -> None:
    # 6 GPUs free in all, but no node keeps 3 once the first two groups sit on both nodes
    with pytest.raises(PlacementError, match=r"prefill: group 0 needs 2 GPU on one node"):
        plan_placement(_cuda(prefill={"replicas": 1, "tp": 2}, decode={"replicas": 2, "tp": 3}), _nodes(4, 4))


def test_cpu_config_reserves_cpu_and_custom_resource_is_honoured() -> None:
    config = config_from_dict({})
    assert plan_placement(config, [NodeResources("a", {"CPU": 2})]).pools["decode"].bundles == ({"CPU": 1.0},)
    with pytest.raises(PlacementError, match="needs 1 fake_gpu"):
        plan_placement(config, [NodeResources("a", {"CPU": 8})], accelerator="fake_gpu")


def test_autoscaling_plans_initial_replicas_within_bounds() -> None:
    config = _cuda(decode={"replicas": 1, "autoscaling": {"min_replicas": 2, "max_replicas": 4}})
    assert plan_placement(config, _nodes(8)).pools["decode"].replicas == 2


def test_nodes_from_ray_keeps_alive_nodes_and_marks_the_head() -> None:
    nodes = nodes_from_ray([
        {"NodeID": "h", "Alive": True, "Resources": {"CPU": 4.0, "node:__internal_head__": 1.0}},
        {"NodeID": "w", "Alive": True, "Resources": {"CPU": 4.0, "GPU": 2.0}},
        {"NodeID": "dead", "Alive": False, "Resources": {"GPU": 8.0}},
    ])
    assert [(n.node_id, n.is_head, n.amount("GPU")) for n in nodes] == [("h", True, 0.0), ("w", False, 2.0)]
