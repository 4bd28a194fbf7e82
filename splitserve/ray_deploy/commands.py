"""``splitserve up / scale / status / down``: a cluster config served by Ray Serve.

Each command connects to the Ray cluster (``--address``, default the local one), acts through
Serve's controller and returns an exit code; `splitserve.cli` only dispatches here.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import yaml

from cluster.config import ClusterConfig, ConfigError, load_config
from engine.errors import SplitserveError
from splitserve.ray_deploy import APP_NAME, POOL_DEPLOYMENTS

READY_TIMEOUT_S = 900.0


def _say(out: TextIO, message: str) -> None:
    print(f"splitserve: {message}", file=out, flush=True)


def load_up_config(config_path: str | None, overrides: Mapping[str, Any]) -> ClusterConfig:
    """The config as ``serve`` reads it (flags over the file), plus the Ray-side checks."""
    from splitserve.launch_options import apply_overrides
    from splitserve.ray_deploy.app import check_group_shapes_here, check_ray_servable
    from splitserve.router_settings import router_settings

    config = apply_overrides(load_config(config_path), dict(overrides))
    router_settings(config)
    check_ray_servable(config)
    model = Path(config.model).expanduser()
    if not config.is_embedded_model and not model.is_absolute() and model.exists():
        # replicas run in other working directories: hand them a path that means the same folder
        config = config.model_copy(update={"model": str(model.resolve())})
    check_group_shapes_here(config)
    return config


def up(config_path: str | None, *, address: str | None = None, overrides: Mapping[str, Any] | None = None,
       dry_run: bool = False, options: Mapping[str, Any] | None = None, out: TextIO = sys.stderr) -> int:
    """Deploy (or with ``dry_run`` print the Serve config of) a cluster config; waits until it serves."""
    from splitserve.ray_deploy.app import serve_config

    try:
        config = load_up_config(config_path, overrides or {})
        if dry_run:
            print(yaml.safe_dump(serve_config(config, **(options or {})), sort_keys=False), end="")
            return 0
        from splitserve.ray_deploy.connect import connect

        if connect(address, start_if_missing=True):
            _say(out, "started a local Ray head (`ray stop` or `splitserve down --stop-ray` ends it)")
        return _deploy(config, dict(options or {}), out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SplitserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _deploy(config: ClusterConfig, options: dict[str, Any], out: TextIO) -> int:
    from splitserve.ray_deploy.app import current_plan, serve_config

    # PlacementError (a ConfigError) before any start
    plan = current_plan(config, options.get("accelerator"), float(options.get("per_rank", 1.0)))
    for pool in POOL_DEPLOYMENTS:
        if pool in plan.pools and plan.pools[pool].replicas:
            p = plan.pools[pool]
            _say(out, f"{pool}: {p.replicas} group(s) of {p.world_size} x {p.bundles[0]} ({p.strategy})")
    cfg = serve_config(config, **options)  # the builder starts the control-plane actor (and token)
    _apply(cfg)
    _say(out, f"deploying {APP_NAME} through Ray Serve (model {config.model_name})")
    if not wait_running(out=out):
        return 1
    http = cfg["http_options"]
    print(f"splitserve: router listening on http://{http['host']}:{http['port']}", flush=True)
    print("ready", flush=True)
    return 0


def _apply(cfg: dict[str, Any]) -> None:
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    client = serve_start(http_options=cfg["http_options"], proxy_location=cfg.get("proxy_location"))
    running = client.get_serve_details().get("http_options") or {}
    want = cfg["http_options"]
    if (running.get("host"), running.get("port")) != (want["host"], want["port"]):
        # Serve's HTTP options are fixed for the cluster while Serve runs: deploying anyway
        # would leave the router on another port than the one printed
        raise SplitserveError(
            f"Serve already runs on this Ray cluster with its proxy on {running.get('host')}:{running.get('port')}; "
            f"set router.host/router.port to that, or stop Serve (`serve shutdown`) first")
    client.deploy_apps(ServeDeploySchema.model_validate(cfg))


def wait_running(timeout: float = READY_TIMEOUT_S, out: TextIO = sys.stderr) -> bool:
    """Until the application and every deployment are RUNNING at their target; False on a failure."""
    from ray import serve

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP_NAME)
        if app is not None and app.status == "DEPLOY_FAILED":
            _say(out, f"error: deploy failed: {app.message}")
            return False
        if app is not None and app.status == "RUNNING" and _at_target():
            return True
        time.sleep(0.5)
    _say(out, f"error: {APP_NAME} not running after {timeout:.0f}s")
    return False


def _at_target() -> bool:
    details = _details().get("applications", {}).get(APP_NAME, {})
    for dep in details.get("deployments", {}).values():
        running = [r for r in dep.get("replicas", []) if r["state"] == "RUNNING"]
        if dep["status"] != "HEALTHY" or len(running) != dep["target_num_replicas"]:
            return False
    return True


def _details() -> dict[str, Any]:
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


def deployed_config() -> dict[str, Any]:
    """The Serve config last deployed by ``up``/``scale`` (raises `SplitserveError` when none)."""
    details = _details()
    app = details.get("applications", {}).get(APP_NAME)
    if app is None or not app.get("deployed_app_config"):
        raise SplitserveError(f"no {APP_NAME} application is deployed on this Ray cluster (run `splitserve up`)")
    return {"proxy_location": details.get("proxy_location"),
            "http_options": {k: (details.get("http_options") or {}).get(k) for k in ("host", "port")},
            "applications": [app["deployed_app_config"]]}


def scale(prefill: int | None, decode: int | None, *, address: str | None = None, wait: bool = True,
          out: TextIO = sys.stderr) -> int:
    """Resize pools live: Serve adds replicas, or drains and removes them (no request fails)."""
    from splitserve.ray_deploy.connect import connect

    wanted = {k: v for k, v in (("prefill", prefill), ("decode", decode)) if v is not None}
    for pool, n in wanted.items():
        if n < 1:
            print(f"error: --{pool}: must be >= 1, got {n}", file=sys.stderr)
            return 2
    try:
        connect(address)
        cfg = copy.deepcopy(deployed_config())
        deployments = {d["name"]: d for d in cfg["applications"][0]["deployments"]}
        for pool, n in wanted.items():
            if pool not in deployments:
                raise SplitserveError(f"--{pool}: the deployed config has no {pool} pool")
            deployments[pool].pop("autoscaling_config", None)  # a fixed size replaces autoscaling
            deployments[pool]["num_replicas"] = n
        _apply(cfg)
    except SplitserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _say(out, "scaling " + ", ".join(f"{p} to {n}" for p, n in wanted.items()))
    return 0 if not wait or wait_running(out=out) else 1


def down(*, address: str | None = None, stop_ray: bool = False, out: TextIO = sys.stderr) -> int:
    """Delete the application (replicas drain), the embedded Redis, then Serve if nothing else uses it."""
    from ray import serve

    from splitserve.ray_deploy.connect import connect, stop_local_ray
    from splitserve.ray_deploy.control_plane_actor import stop_control_plane

    try:
        connect(address)
    except SplitserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)
        _say(out, f"deleted the {APP_NAME} application")
    if stop_control_plane():
        _say(out, "stopped the control-plane actor (and the embedded redis-server)")
    if not serve.status().applications:
        serve.shutdown()
    if stop_ray:
        stop_local_ray()
        _say(out, "stopped the local Ray")
    return 0


def status(*, address: str | None = None, out: TextIO | None = None) -> int:
    """Print the replica table (``splitserve status``)."""
    from cluster.config import config_from_dict
    from splitserve.ray_deploy.connect import connect
    from splitserve.ray_deploy.control_plane_actor import find_control_plane
    from splitserve.ray_deploy.status import collect_rows, render, router_replicas

    try:
        connect(address)
        app_cfg = deployed_config()["applications"][0]
        config = config_from_dict(app_cfg["args"]["config"])
        found = find_control_plane(config)
        if found is None:
            raise SplitserveError("the control-plane actor is not running (run `splitserve up`)")
        token, redis_url = found
    except SplitserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    details = _details()
    gpus = {p: getattr(config, p).tp * getattr(config, p).pp if config.device == "cuda" else 0
            for p in POOL_DEPLOYMENTS}
    render(collect_rows(details, token, redis_url, gpus), router_replicas(details), out or sys.stdout)
    return 0
