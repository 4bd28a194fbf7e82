"""The cluster's control plane as a service to start and stop: a private ``redis-server`` for
``redis: embedded``, or the configured URL, checked reachable before any worker is told about it
(a worker that cannot register would otherwise look like a slow start)."""

from __future__ import annotations

from cluster.config import RedisConfig
from cluster.redis_server import EmbeddedRedis, RedisServerError, redact_url
from protocol.control_plane import ControlPlane
from splitserve.errors import ClusterStartError


class RedisService:
    """``url`` is what workers and the router connect to (it may hold the password: hand it on
    through the environment, never print it); ``control_plane`` is this process's client, which
    seals and checks records with the cluster ``token``."""

    def __init__(self, url: str, control_plane: ControlPlane, server: EmbeddedRedis | None) -> None:
        self.url = url
        self.control_plane = control_plane
        self.server = server

    @classmethod
    def start(cls, config: RedisConfig, ttl_s: float, token: str = "") -> RedisService:
        server: EmbeddedRedis | None = None
        if config.embedded:
            try:
                server = EmbeddedRedis().start()
            except RedisServerError as e:
                raise ClusterStartError(str(e)) from None
        url = server.url if server is not None else config.connect_url()
        cp = ControlPlane.from_url(url, ttl_s=ttl_s, token=token)
        try:
            cp.client.ping()
        except Exception as e:
            cp.close()
            if server is not None:
                server.stop()
            raise ClusterStartError(f"redis at {redact_url(url)} is not reachable: {e}") from None
        return cls(url, cp, server)

    def stop(self) -> None:
        """Close the client, then stop the embedded server (if any). Idempotent."""
        self.control_plane.close()
        if self.server is not None:
            self.server.stop()
            self.server = None
