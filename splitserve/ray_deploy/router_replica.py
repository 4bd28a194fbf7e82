"""`RouterIngress`: the router's FastAPI app (the one `splitserve serve` runs) as Serve's ingress.

Each replica builds its own app: tokenizer, `ClusterView` polling the control plane, gRPC
backend to the workers. Replicas share nothing but Redis, so any number of them can run;
admission limits (``router.max_in_flight_requests`` ...) then hold per replica.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve

from cluster.config import config_from_dict
from engine.model_store import pull
from protocol.control_plane import ControlPlane
from protocol.grpc_auth import GrpcTls
from splitserve.router_settings import router_settings
from splitserve.serve import create_router_app


@serve.ingress()
class RouterIngress:
    """Init args: the cluster config (as a dict), the cluster token, the control-plane URL, the TTL,
    then the pools' handles (bound only so that the pools belong to the application)."""

    def __init__(self, config: dict[str, Any], token: str, redis_url: str, ttl_s: float, *pools: Any) -> None:
        cfg = config_from_dict(config)
        model = str(pull(cfg.model, progress=False))
        tls = GrpcTls(cfg.tls.ca_file, cfg.tls.cert_file, cfg.tls.key_file) if cfg.tls.enabled else None
        self._app, self._cp = create_router_app(router_settings(cfg), model, token, redis_url, ttl_s, tls)
        self._health_cp = ControlPlane.from_url(redis_url, ttl_s=ttl_s, token=token)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app

    def check_health(self) -> None:
        """The router is only useful while it can read the control plane."""
        self._health_cp.client.ping()

    def __del__(self) -> None:
        for cp in (getattr(self, "_cp", None), getattr(self, "_health_cp", None)):
            if cp is not None:
                cp.close()
