"""The Serve application of a cluster config: what ``splitserve up`` deploys and what
``splitserve up --dry-run`` writes for ``serve deploy`` / KubeRay's RayService.

`build_app` is the application builder named by the Serve config (``import_path``). It runs
inside the Ray cluster when Serve (re)builds the application, so the placement check and the
embedded Redis happen there too, whoever deployed. Replica counts live in the Serve config's
``deployments:`` overrides (not in the builder's args), so ``splitserve scale`` changes only
them and Serve resizes the pools without restarting a replica.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from cluster.config import ClusterConfig, ConfigError, config_from_dict
from cluster.group_shapes import kv_groups
from cluster.placement import PlacementPlan, PoolPlacement, nodes_from_ray, plan_placement
from splitserve.ray_deploy import APP_NAME, POOL_DEPLOYMENTS, ROUTER_DEPLOYMENT
from splitserve.ray_deploy.autoscaling import serve_autoscaling_config
from splitserve.ray_deploy.control_plane_actor import ensure_control_plane
from splitserve.ray_deploy.router_replica import RouterIngress
from splitserve.ray_deploy.worker_replica import WorkerReplica
from splitserve.serve import worker_specs

IMPORT_PATH = "splitserve.ray_deploy.app:build_app"
DEFAULT_ARGS: dict[str, Any] = {
    "router_replicas": 1, "accelerator": None, "per_rank": 1.0, "registry_ttl_s": 3.0,
    "health_check_period_s": 10.0, "health_check_timeout_s": 30.0, "drain_timeout_s": 300.0,
}


def check_ray_servable(config: ClusterConfig) -> None:
    """`ConfigError` for what this build cannot serve under Ray (named field, before anything starts).
    Multi-rank groups are served as the local launcher serves them (`check_pairing`: a sharded
    pool with prefill workers needs a transport that writes head slices); a replica then runs
    every rank of its group."""
    from cluster.group_shapes import check_pairing  # lazy: imports the engine's model config

    check_pairing(config)
    auto = config.prefill.autoscaling
    if auto is not None and auto.min_replicas == 0:
        raise ConfigError("prefill.autoscaling.min_replicas: under Ray a prefill pool keeps at least 1 replica "
                          "(a decode-only cluster: prefill.replicas: 0 and no autoscaling block)")


def check_group_shapes_here(config: ClusterConfig) -> None:
    """`ConfigError` naming the field when a sharded pool's tp/pp/ep cannot split the model, if the
    model folder is on this machine too: ``up`` then refuses before anything starts (the replicas
    check again on their nodes, where the folder must be)."""
    if all(getattr(config, p).world_size == 1 for p in POOL_DEPLOYMENTS):
        return
    from engine import model_store

    folder = model_store.default_model_dir() if config.is_embedded_model else Path(config.model).expanduser()
    if model_store.is_complete(folder) if config.is_embedded_model else folder.exists():
        from cluster.group_shapes import check_model_shapes
        from engine.config import ModelConfig
        from engine.weights import resolve_model

        check_model_shapes(config, ModelConfig.from_hf_dict(resolve_model(str(folder))[0]), None)


def serve_config(config: ClusterConfig, **options: Any) -> dict[str, Any]:
    """The Serve config (``serve deploy`` schema) of ``config``. It holds no secret: the builder
    takes the token from the control-plane actor (`ensure_control_plane`). ``proxy_location``:
    Serve's HTTP proxies, ``EveryNode`` (behind a load balancer) or ``HeadOnly``."""
    check_ray_servable(config)
    proxy = options.pop("proxy_location", "EveryNode")
    # only what differs from the defaults: the file stays short and valid as fields are added
    args: dict[str, Any] = {"config": config.model_dump(mode="json", exclude_defaults=True), **DEFAULT_ARGS,
                            **options}
    deployments: list[dict[str, Any]] = [{"name": ROUTER_DEPLOYMENT, "num_replicas": args["router_replicas"]}]
    for pool in _pools(config):
        deployments.append({"name": pool, **_replica_override(config, pool)})
    return {
        "proxy_location": proxy,
        "http_options": {"host": config.router.host, "port": config.router.port},
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH,
                          "args": args, "deployments": deployments}],
    }


def _pools(config: ClusterConfig) -> list[str]:
    return [p for p in POOL_DEPLOYMENTS if p == "decode" or config.prefill.replicas > 0]


def _replica_override(config: ClusterConfig, pool: str) -> dict[str, Any]:
    section = getattr(config, pool)
    if section.autoscaling is None:
        return {"num_replicas": section.replicas}
    auto = section.autoscaling
    initial = max(auto.min_replicas, min(section.replicas, auto.max_replicas))
    return {"autoscaling_config": serve_autoscaling_config(auto, initial)}


def current_plan(config: ClusterConfig, accelerator: str | None = None, per_rank: float = 1.0) -> PlacementPlan:
    """`plan_placement` against the connected cluster's alive nodes (``per_rank``: the share of an
    accelerator each rank reserves; below 1 several replicas share a GPU)."""
    return plan_placement(config, nodes_from_ray(ray.nodes()), accelerator=accelerator, per_rank=per_rank)


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application builder (see the module docstring)."""
    opts = {**DEFAULT_ARGS, **args}
    config = config_from_dict(opts["config"], source="args.config")
    check_ray_servable(config)
    plan = current_plan(config, opts["accelerator"], float(opts["per_rank"]))  # an impossible config is refused here
    token, redis_url = ensure_control_plane(config)  # the token never travels in (logged) args
    ttl = float(opts["registry_ttl_s"])
    pools = [_pool_deployment(config, plan.pools[pool], opts).bind(
        _spec_json(config, pool, plan), token, redis_url, ttl, 600.0, float(opts["drain_timeout_s"]))
        for pool in _pools(config)]
    router = serve.deployment(RouterIngress).options(
        name=ROUTER_DEPLOYMENT, num_replicas=int(opts["router_replicas"]), ray_actor_options={"num_cpus": 0},
        health_check_period_s=opts["health_check_period_s"], health_check_timeout_s=opts["health_check_timeout_s"],
    )
    return router.bind(config.to_dict(), token, redis_url, ttl, *pools)  # pools: part of the app's graph


def placement_options(placement: PoolPlacement) -> dict[str, Any]:
    """Serve options reserving one placement group per replica (a bundle per rank); the replica
    actor itself takes bundle 0 (GPU ids then come from Ray: ``CUDA_VISIBLE_DEVICES``)."""
    bundle0 = placement.bundles[0]
    actor = {"num_cpus": bundle0.get("CPU", 0.0), "num_gpus": bundle0.get("GPU", 0.0),
             "resources": {k: v for k, v in bundle0.items() if k not in ("CPU", "GPU")}}
    return {"placement_group_bundles": [dict(b) for b in placement.bundles],
            "placement_group_strategy": placement.strategy, "ray_actor_options": actor}


def _pool_deployment(config: ClusterConfig, placement: PoolPlacement, opts: dict[str, Any]) -> Any:
    return serve.deployment(WorkerReplica).options(
        name=placement.pool, **_replica_override(config, placement.pool), **placement_options(placement),
        max_ongoing_requests=4,
        health_check_period_s=opts["health_check_period_s"], health_check_timeout_s=opts["health_check_timeout_s"],
        graceful_shutdown_timeout_s=float(opts["drain_timeout_s"]) + 30.0, graceful_shutdown_wait_loop_s=0.5,
    )


def _spec_json(config: ClusterConfig, pool: str, plan: PlacementPlan) -> str:
    """The pool's `WorkerSpec`, as the local launcher builds it; the replica fills in the model
    path, worker id and host on its node. CPU workers get one torch thread per reserved CPU."""
    # one group of this pool; the decode spec is built without prefill workers
    one = {p: getattr(config, p).model_copy(update={"replicas": int(p == pool or p == "decode"), "autoscaling": None})
           for p in POOL_DEPLOYMENTS}
    spec = next(s for s in worker_specs(config.model_copy(update=one), config.model) if s.role == pool)
    threads = int(plan.pools[pool].bundles[0].get("CPU", 1)) if config.device == "cpu" else 0
    # kv_groups from the whole config: the one-group copy above has no prefill pool for decode
    return spec.replace(worker_id="", num_threads=max(1, threads) if config.device == "cpu" else 0,
                        kv_groups=kv_groups(config)).to_json()
