"""Transport registry: a config names a backend, start-up gets a `KVTransport` or a clear error.

Backends are imported lazily, so a worker configured for ``tcp`` never needs NIXL installed,
and a missing package shows up at start-up as `TransportUnavailableError` with the pip
requirement to install, not as an ImportError in the middle of the first request.

Backends: ``nixl``, ``tcp``, ``ucxx`` (``ucxx-cu12``), ``mpi`` (``mpi4py`` + the ``mpich``
wheel) and ``nccl`` (GPU only; CuPy, ``cupy-cuda12x``, imported when one is created).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from kvtransfer.base import KVTransport, TransportOptions
from kvtransfer.errors import TransportUnavailableError, UnknownTransportError


@dataclass(frozen=True)
class TransportSpec:
    """Where a backend lives and what it needs: ``probe`` is imported first to test ``requirement``."""

    name: str
    module: str
    cls: str
    probe: str | None = None
    requirement: str | None = None


_REGISTRY: dict[str, TransportSpec] = {}


def register_transport(spec: TransportSpec) -> None:
    """Add (or replace) a backend; plugins and tests may register their own."""
    _REGISTRY[spec.name] = spec


def unregister_transport(name: str) -> None:
    _REGISTRY.pop(name, None)


def known_transports() -> list[str]:
    return sorted(_REGISTRY)


def transport_class(name: str) -> type[KVTransport]:
    """Resolve a backend name to its class, importing its package (the start-up check)."""
    spec = _REGISTRY.get(name)
    if spec is None:
        raise UnknownTransportError(name, known_transports())
    if spec.probe is not None:
        try:
            importlib.import_module(spec.probe)
        except (ImportError, OSError) as exc:  # OSError: a native library that fails to load
            raise TransportUnavailableError(name, spec.requirement or spec.probe, exc) from exc
    cls = getattr(importlib.import_module(spec.module), spec.cls)
    if not (isinstance(cls, type) and issubclass(cls, KVTransport)):
        raise TypeError(f"{spec.module}.{spec.cls} is not a KVTransport")
    return cls


def create_transport(name: str, agent_name: str, options: TransportOptions | None = None) -> KVTransport:
    """The one entry point workers use: ``create_transport(cfg.kv_transfer.backend, agent, opts)``."""
    return transport_class(name)(agent_name, options)


register_transport(TransportSpec(
    "nixl", "kvtransfer.nixl_backend", "NixlTransport", probe="nixl._api", requirement="nixl>=0.6"
))
register_transport(TransportSpec("tcp", "kvtransfer.tcp_backend", "TcpTransport"))
register_transport(TransportSpec(
    "ucxx", "kvtransfer.ucxx_backend", "UcxxTransport", probe="ucxx._lib.libucxx", requirement="ucxx-cu12>=0.45"
))
register_transport(TransportSpec("nccl", "kvtransfer.nccl_backend", "NcclTransport"))  # CuPy: lazily
register_transport(TransportSpec(
    "mpi", "kvtransfer.mpi_backend", "MpiTransport", probe="mpi4py", requirement="mpi4py>=4.0"
))
