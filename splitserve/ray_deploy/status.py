"""``splitserve status``: one row per worker replica, from Serve (replica, node, state) joined
with the worker's own report (gRPC ``Status``: queue, KV use, throughput) by worker id, which a
`WorkerReplica` derives from its Serve replica id."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TextIO

from splitserve.ray_deploy import APP_NAME, POOL_DEPLOYMENTS, ROUTER_DEPLOYMENT


@dataclass(frozen=True)
class ReplicaRow:
    pool: str
    replica: str
    node: str
    gpus: int
    state: str
    queue: int | None = None
    kv_use: float | None = None
    tokens_per_s: float | None = None


def _worker_stats(role: str, address: str, token: str) -> tuple[int, float, float] | None:
    """(queue, KV use, tokens/s) from the worker itself; decode: running / step time, prefill:
    prompt tokens over two samples 0.5 s apart."""
    import time

    from protocol.decode_client import DecodeClient
    from protocol.prefill_client import PrefillClient

    client = DecodeClient(address, token) if role == "decode" else PrefillClient(address, token)
    try:
        first = client.status(timeout=3.0)
        if role == "prefill":
            time.sleep(0.5)
        s = client.status(timeout=3.0)
    except Exception:
        return None
    finally:
        client.close()
    used = 1.0 - s.num_free_blocks / s.num_total_blocks if s.num_total_blocks else 0.0
    if role == "decode":
        tps = s.num_running / (s.decode_step_p50_ms / 1000) if s.decode_step_p50_ms > 0 and s.num_running else 0.0
    else:
        tps = (s.prompt_tokens_computed - first.prompt_tokens_computed) / 0.5
    return s.num_running + s.num_waiting if role == "prefill" else s.num_waiting, used, tps


def collect_rows(details: dict[str, Any], token: str, redis_url: str,
                 gpus_per_group: dict[str, int]) -> list[ReplicaRow]:
    """The rows of every pool replica (``details``: Serve's ``get_serve_details()``)."""
    from protocol.control_plane import ControlPlane

    app = details.get("applications", {}).get(APP_NAME, {})
    cp = ControlPlane.from_url(redis_url, token=token)
    try:
        addresses = {w.worker_id: w.address for w in cp.list_workers()}
    finally:
        cp.close()
    rows = []
    for pool in POOL_DEPLOYMENTS:
        for r in app.get("deployments", {}).get(pool, {}).get("replicas", []):
            rid = r["replica_id"]
            address = addresses.get(f"{pool}-{rid}")
            stats = _worker_stats(pool, address, token) if address else None
            rows.append(ReplicaRow(pool, rid, r.get("node_ip") or r.get("node_id", "?")[:12],
                                   gpus_per_group.get(pool, 0), str(getattr(r["state"], "value", r["state"])),
                                   *(stats or (None, None, None))))
    return rows


def router_replicas(details: dict[str, Any]) -> int:
    dep = details.get("applications", {}).get(APP_NAME, {}).get("deployments", {}).get(ROUTER_DEPLOYMENT, {})
    return sum(1 for r in dep.get("replicas", []) if r["state"] == "RUNNING")


def render(rows: list[ReplicaRow], routers: int, out: TextIO) -> None:
    head = ("pool", "replica", "node", "GPUs", "state", "queue", "KV use", "tokens/s")
    table = [head] + [(r.pool, r.replica, r.node, str(r.gpus), r.state,
                       "-" if r.queue is None else str(r.queue),
                       "-" if r.kv_use is None else f"{r.kv_use:.0%}",
                       "-" if r.tokens_per_s is None else f"{r.tokens_per_s:.1f}") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip(), file=out)
    print(f"router replicas: {routers}", file=out)
