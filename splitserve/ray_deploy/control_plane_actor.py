"""The cluster's secrets and (``redis: embedded``) its redis-server, held by one detached actor.

The cluster token must reach every replica but never a log or a file: the Serve config's
``args`` are logged by Serve when it builds the application, so the token lives in this actor
(created by ``up``, or by the builder from ``SPLITSERVE_CLUSTER_TOKEN`` / a fresh one when the
Serve config is deployed directly), and the builder reads it from here.

With ``redis: embedded`` the actor also runs a private redis-server, as `splitserve serve` does,
with a password generated per start, bound to the head node's address (the head outlives worker
nodes; it holds the GCS). Production clusters should use an external, replicated Redis.
"""

from __future__ import annotations

import os
import secrets

import ray

from cluster.config import ClusterConfig
from cluster.redis_server import EmbeddedRedis
from protocol.worker_spec import TOKEN_ENV
from splitserve.ray_deploy import CONTROL_PLANE_ACTOR, NAMESPACE


class ControlPlaneActor:
    """Holds the token; owns the embedded redis-server when there is one (it dies with the actor)."""

    def __init__(self, token: str, embedded: bool) -> None:
        self._token = token
        self._server = EmbeddedRedis(host=ray.util.get_node_ip_address()).start() if embedded else None

    def token(self) -> str:
        return self._token

    def redis_url(self) -> str | None:
        return self._server.url if self._server is not None else None

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()


def ensure_control_plane(config: ClusterConfig, token: str | None = None) -> tuple[str, str]:
    """(token, control-plane URL) of this cluster; starts the actor on the head node when it
    does not run yet (``token`` None: from the environment, else fresh); a running one is reused."""
    actor_cls = ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001})(ControlPlaneActor)
    token = token or os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(32)
    actor = actor_cls.options(name=CONTROL_PLANE_ACTOR, namespace=NAMESPACE, lifetime="detached",
                              get_if_exists=True).remote(token, config.redis.embedded)
    held, url = ray.get([actor.token.remote(), actor.redis_url.remote()], timeout=120)
    return str(held), str(url) if url is not None else config.redis.connect_url()


def find_control_plane(config: ClusterConfig) -> tuple[str, str] | None:
    """(token, URL) of the running cluster, or None when its actor does not run."""
    try:
        actor = ray.get_actor(CONTROL_PLANE_ACTOR, namespace=NAMESPACE)
    except ValueError:
        return None
    held, url = ray.get([actor.token.remote(), actor.redis_url.remote()], timeout=30)
    return str(held), str(url) if url is not None else config.redis.connect_url()


def stop_control_plane() -> bool:
    """Stop the embedded server and the actor; False when none ran."""
    try:
        actor = ray.get_actor(CONTROL_PLANE_ACTOR, namespace=NAMESPACE)
    except ValueError:
        return False
    try:
        ray.get(actor.stop.remote(), timeout=30)
    finally:
        ray.kill(actor)
    return True
