"""What ``splitserve up`` hands Serve, checked without a cluster: the Serve config (``--dry-run``)
is valid for ``serve deploy``, holds no secret, maps ``autoscaling:`` blocks, deploys sharded pools
(a bundle per rank); refusals name fields, and Ray refuses exactly the group shapes that
``splitserve serve`` refuses."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from ray.serve.config import AutoscalingContext
from ray.serve.schema import ServeDeploySchema

from cluster.config import ClusterConfig, ConfigError, config_from_dict, load_config
from cluster.group_shapes import check_pairing
from cluster.placement import NodeResources, plan_placement
from protocol.worker_spec import WorkerSpec
from splitserve.ray_deploy.app import _spec_json, check_ray_servable, serve_config
from splitserve.ray_deploy.autoscaling import POLICY_PATH, PoolLoadPolicy

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_prints_a_valid_serve_config_without_secrets() -> None:
    done = subprocess.run([sys.executable, "-m", "splitserve", "up", "--dry-run", "deploy/ray-2node.yaml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    cfg = yaml.safe_load(done.stdout)
    ServeDeploySchema.model_validate(cfg)  # what `serve deploy` and RayService accept
    app = cfg["applications"][0]
    assert app["import_path"] == "splitserve.ray_deploy.app:build_app"
    assert "token" not in app["args"] and "password" not in done.stdout.lower().replace("password_env", "")
    deployments = {d["name"]: d for d in app["deployments"]}
    assert deployments["prefill"] == {"name": "prefill", "num_replicas": 2}
    auto = deployments["decode"]["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["initial_replicas"]) == (2, 4, 2)
    assert auto["policy"] == {"policy_function": POLICY_PATH, "policy_kwargs": {"target": 64.0}}


def _refusal(check: Callable[[ClusterConfig], None], config: ClusterConfig) -> str | None:
    try:
        check(config)
    except ConfigError as e:
        return str(e)
    return None


@pytest.mark.parametrize("path", ["deploy/ray-8gpu.yaml", "deploy/ray-2node.yaml", "deploy/local.yaml"])
def test_ray_refuses_exactly_the_group_shapes_the_local_launcher_refuses(path: str) -> None:
    config = load_config(ROOT / path)
    assert _refusal(check_ray_servable, config) == _refusal(check_pairing, config)


def test_up_refuses_a_sharded_pool_with_prefill_workers_as_serve_does() -> None:
    # ray-8gpu.yaml: prefill tp=2 and decode tp=4 groups with prefill workers (KV between sharded groups) over nixl
    local = _refusal(check_pairing, load_config(ROOT / "deploy/ray-8gpu.yaml"))
    done = subprocess.run([sys.executable, "-m", "splitserve", "up", "--dry-run", "deploy/ray-8gpu.yaml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    if local is None:  # the local launcher serves this shape (KV between sharded groups): so does Ray
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode == 2 and f"error: {local}" in done.stderr
        assert local.startswith("kvtransfer.backend: ") and "prefill.replicas: 0" in local  # nixl: whole blocks only


def test_sharded_decode_pool_is_deployed_with_a_bundle_per_rank() -> None:
    config = config_from_dict({"prefill": {"replicas": 0}, "decode": {"replicas": 2, "tp": 2, "pp": 2}})
    cfg = serve_config(config)
    assert cfg["applications"][0]["deployments"][1] == {"name": "decode", "num_replicas": 2}
    plan = plan_placement(config, [NodeResources("n0", {"CPU": 16.0})])
    assert plan.pools["decode"].bundles == ({"CPU": 1.0},) * 4
    spec = WorkerSpec.from_json(_spec_json(config, "decode", plan))  # rank 0's spec: the replica adds the ranks
    assert (spec.role, spec.tp_size, spec.pp_size, spec.num_threads) == ("decode", 2, 2, 1)


def test_decode_only_cluster_omits_the_prefill_deployment() -> None:
    cfg = serve_config(config_from_dict({"prefill": {"replicas": 0}}))
    assert [d["name"] for d in cfg["applications"][0]["deployments"]] == ["router", "decode"]


@pytest.mark.parametrize(("pool", "block", "field"), [
    ("decode", {"min_replicas": 0, "max_replicas": 2}, "decode.autoscaling.min_replicas"),
    ("prefill", {"min_replicas": 3, "max_replicas": 2}, "prefill.autoscaling.min_replicas"),
    ("prefill", {"max_replicas": 2, "target": 3}, "prefill.autoscaling.target"),
])
def test_bad_autoscaling_blocks_name_the_field(pool: str, block: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        config_from_dict({pool: {"autoscaling": block}})


def _ctx(loads: list[float] | None, current: int) -> AutoscalingContext:
    metrics = {"load": {f"r{i}": v for i, v in enumerate(loads)}} if loads is not None else {}
    return AutoscalingContext(
        deployment_id=None, deployment_name="decode", app_name="splitserve", current_num_replicas=current,
        target_num_replicas=current, running_replicas=[], total_num_requests=0.0, total_queued_requests=0.0,
        aggregated_metrics=metrics, raw_metrics={}, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8, policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=None, config=None)


def test_pool_policy_sizes_the_pool_from_the_workers_load() -> None:
    policy = PoolLoadPolicy(target=8.0)
    assert policy(_ctx([20.0, 14.0], 2))[0] == 5  # 34 sequences / 8 per replica
    assert policy(_ctx([1.0, 0.0, 0.0], 3))[0] == 1
    assert policy(_ctx(None, 3))[0] == 3  # no report yet: keep the size


def test_kuberay_manifest_carries_the_current_dry_run_output() -> None:
    manifest = yaml.safe_load((ROOT / "deploy/kuberay/rayservice.yaml").read_text())
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert embedded == serve_config(load_config(ROOT / "deploy/kuberay/cluster.yaml"))


def test_relative_model_folder_becomes_absolute_for_replicas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from splitserve.ray_deploy.commands import load_up_config

    (tmp_path / "models" / "m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert load_up_config(None, {"model": "models/m"}).model == str(tmp_path / "models" / "m")
    assert load_up_config(None, {}).model == "smollm2"  # the embedded model's name stays a name


def test_up_checks_a_sharded_pool_against_the_model_before_starting(smollm2_path: Path) -> None:
    from splitserve.ray_deploy.commands import load_up_config

    # SmolLM2-135M: 9 attention heads, 3 KV heads, 30 layers
    with pytest.raises(ConfigError, match=r"decode.tp = 2 does not divide the model's 9 attention heads"):
        load_up_config(None, {"prefill.replicas": 0, "decode.tp": 2})
    assert load_up_config(None, {"prefill.replicas": 0, "decode.tp": 3, "decode.pp": 2}).decode.world_size == 6


def test_sharded_pools_with_prefill_workers_get_group_transports_under_ray() -> None:
    """Both pools' specs say kv_groups (every rank its own transport), as `splitserve serve` gives them."""
    config = config_from_dict({"prefill": {"replicas": 1}, "decode": {"replicas": 1, "tp": 2},
                               "kvtransfer": {"backend": "tcp"}})
    plan = plan_placement(config, [NodeResources("n0", {"CPU": 16.0})])
    specs = [WorkerSpec.from_json(_spec_json(config, pool, plan)) for pool in ("prefill", "decode")]
    assert [(s.role, s.tp_size, s.kv_groups) for s in specs] == [("prefill", 1, True), ("decode", 2, True)]
