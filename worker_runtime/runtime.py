"""What both worker kinds share at start-up: the gRPC server, the KV transport, a stop handle.

`decode_worker.server.start_decode_worker` and `prefill_worker.server.start_prefill_worker`
build on these; `worker_runtime.main` runs either one as a process.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from engine.config import parse_dtype
from engine.kv_cache_pool import KVCachePool, KVLayout
from protocol.grpc_auth import CHANNEL_OPTIONS, TokenInterceptor
from protocol.worker_spec import WorkerSpec
from worker_runtime.agent import attach_worker_agent, load_from_snapshot

log = logging.getLogger(__name__)


@dataclass
class RunningWorker:
    """A started worker inside this process; ``stop()`` undoes everything start did."""

    worker_id: str
    address: str  # host:port its gRPC server is bound to
    agent_name: str  # its KV transport peer name
    _stops: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _drains: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def on_stop(self, fn: Callable[[], None]) -> None:
        self._stops.append(fn)

    def on_drain(self, fn: Callable[[], None]) -> None:
        self._drains.append(fn)

    def drain(self) -> None:
        """Take no new work (marked draining in the control plane, so the router stops choosing
        this worker) while what is in flight runs to its end; `stop` follows once the launcher
        saw it idle."""
        while self._drains:
            fn = self._drains.pop()
            try:
                fn()
            except Exception:
                log.exception("worker %s: error while draining", self.worker_id)

    def stop(self) -> None:
        """Stops in reverse start order; a failing step is logged and the rest still run."""
        while self._stops:
            fn = self._stops.pop()
            try:
                fn()
            except Exception:
                log.exception("worker %s: error while stopping", self.worker_id)


def bind_server(spec: WorkerSpec, token: str, max_workers: int) -> tuple[grpc.Server, str]:
    """A gRPC server checking the cluster token, bound (not started); returns it and host:port."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers, thread_name_prefix=f"{spec.role}-grpc"),
        interceptors=[TokenInterceptor(token)],
        options=CHANNEL_OPTIONS,
    )
    tls = spec.grpc_tls()
    where = f"{spec.host}:{spec.port}"
    port = server.add_secure_port(where, tls.server_credentials()) if tls else server.add_insecure_port(where)
    if port == 0:
        raise OSError(f"could not bind {spec.host}:{spec.port}")
    return server, f"{spec.host}:{port}"


def worker_id_for(spec: WorkerSpec, address: str) -> str:
    """Unique per cluster: the transport uses it as the agent name, so two workers never share one."""
    if spec.worker_id:
        return spec.worker_id
    return f"{spec.role}-{socket.gethostname()}-{address.rsplit(':', 1)[1]}"


def agent_name_for(worker_id: str) -> str:
    """This process's KV transport peer name: the worker id and a per-start nonce. A worker
    restarted under the same id (`cluster.supervisor`) must be a new peer to everyone: a
    transport keeps what it learnt of a peer (its address, its metadata) under the peer's name."""
    return f"{worker_id}.{secrets.token_hex(4)}"


def compat_key(spec: WorkerSpec) -> dict[str, Any]:
    """What the KV layout cannot show but two workers must share for their KV to be
    interchangeable: the weights (random weights of a seed are other weights), the model
    dtype, and the head and layer split (`ParallelConfig`: tp/pp size and rank)."""
    model = Path(spec.model).name + (f"+random-seed{spec.seed}" if spec.random_weights else "")
    return {"model": model, "model_dtype": str(parse_dtype(spec.dtype)), **spec.parallel_config().compat()}


def compat_text(spec: WorkerSpec, layout: KVLayout, transport: Any = None) -> str:
    """The full key the transport handshake compares, as JSON for ``Status`` (a worker group's
    transport says its own: the model's KV geometry and the group's split)."""
    from protocol.kv_handshake import full_compat

    if spec.kv_groups and transport is not None:
        return json.dumps(transport.compat, sort_keys=True)
    return json.dumps(full_compat(layout, compat_key(spec)), sort_keys=True)


def open_transport(spec: WorkerSpec, agent_name: str, token: str, pool: KVCachePool) -> Any:
    """Create the spec's KV transport and register the pool once (the only registration)."""
    from kvtransfer.base import TransportOptions
    from kvtransfer.registry import create_transport

    options = TransportOptions(**{"host": spec.host, **spec.transport_options, "token": token})
    transport = create_transport(spec.transport, agent_name, options)
    try:
        transport.register_pool(pool, compat_key(spec))
    except BaseException:
        transport.close()
        raise
    return transport


def open_worker_transport(spec: WorkerSpec, agent_name: str, token: str, engine: Any) -> Any:
    """The worker's transport: its own, or with ``kv_groups`` its group's (`GroupTransport`:
    every rank writes/receives its own head and layer slices)."""
    if spec.kv_groups:
        from worker_runtime.group_transport import open_group_transport

        return open_group_transport(spec, agent_name, token, engine)
    return open_transport(spec, agent_name, token, engine.kv_cache_pool)


def join_control_plane(worker: RunningWorker, spec: WorkerSpec, engine: Any, loop: Any) -> None:
    """Last step of a worker's start-up (so the router never routes to a worker that is not
    serving yet): register with the launcher's control plane, if it gave one, and from then on
    report the loop's load and KV events there. ``engine`` is its `LLMEngine`, ``loop`` its
    engine thread (``snapshot()`` and ``kv_events``)."""
    attach_worker_agent(
        worker, pool=spec.role, num_blocks=engine.stats().num_total_blocks, block_size=spec.block_size,
        load=lambda: load_from_snapshot(loop.snapshot()), kv_events=loop.kv_events,
        max_num_seqs=spec.max_num_seqs, max_batched_tokens=spec.max_num_batched_tokens,
        transport={"backend": spec.transport},
    )
