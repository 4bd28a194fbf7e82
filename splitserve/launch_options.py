"""What `splitserve serve` decides before anything starts: flag overrides and bind checks.

Flags win over the config file (``--port 8001`` beats ``router.port: 8000``) and go through the
same validation, so a bad flag reads like a bad YAML field (``router.port: ...``). The checks
here run before the model loads and the workers spawn: a port that is taken is reported in a
second, not after a minute of start-up, and an exposed router without an API key is warned about.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from cluster.config import ClusterConfig, ConfigError, config_from_dict


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """``["router.port=8001", "decode.replicas=2"]`` -> dotted paths to YAML-typed values."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set router.port=8001")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: cannot parse the value: {e}") from None
    return out


def apply_overrides(config: ClusterConfig, overrides: Mapping[str, Any], source: str = "flags") -> ClusterConfig:
    """A new config with each dotted path set; re-validated, so errors name the field."""
    if not overrides:
        return config
    data = config.to_dict()
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = data
        for i, part in enumerate(parents):
            child = node.get(part) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: {'.'.join(parents[: i + 1])}: not a config section (in {path!r})")
            node = child
        node[leaf] = value
    return config_from_dict(data, source=source)


def is_local_bind(host: str) -> bool:
    """True when only this machine can reach ``host`` (loopback addresses, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(config: ClusterConfig) -> str | None:
    """The warning for a router reachable from other machines with no API key, else None."""
    if is_local_bind(config.router.host) or config.router.api_keys:
        return None
    return (
        f"the router listens on {config.router.host} without an API key: anyone who can reach this "
        "machine can use it (set --api-key KEY or router.api_keys, or --host 127.0.0.1)"
    )


def check_port_free(host: str, port: int) -> None:
    """Raise `ConfigError` naming ``router.port`` when ``host:port`` cannot be bound right now."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is fine
            s.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"router.port: port {port} on {host} is already in use (pick another with --port, "
                "or --port 0 for a free one)"
            ) from None
        raise ConfigError(f"router.host/router.port: cannot listen on {host}:{port}: {e.strerror or e}") from None
