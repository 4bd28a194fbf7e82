"""Placement planning for a Ray cluster: which worker group goes where, decided before anything starts.

One replica of a pool is one worker group (``tp x pp`` ranks). Its ranks talk over NVLink/shared
memory, so a group must live on one node: one placement group per replica, a bundle per rank,
``STRICT_PACK``. Different groups should land on different nodes where they can (a node failure
then costs one group, and groups don't share a NIC for their KV pushes).

Ray would accept an impossible request and leave it pending forever (a group larger than any node
never schedules; more GPUs than exist leaves replicas waiting). `plan_placement` refuses those up
front with a `PlacementError` naming the pool and the numbers. It is pure: no Ray import, the
nodes' resources are handed in (from ``ray.nodes()`` in production, made up in tests).

On CPU clusters (CI, laptops) the per-rank resource is ``CPU`` or a custom resource that the
nodes declare (``ray start --resources='{"fake_gpu": 4}'``), so placement is testable without GPUs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cluster.config import ClusterConfig, ConfigError, DecodePoolConfig, PrefillPoolConfig

POOLS = ("prefill", "decode")


class PlacementError(ConfigError):
    """The cluster cannot hold the config's worker groups; the message names the pool and the numbers."""


@dataclass(frozen=True)
class NodeResources:
    """One node as the planner sees it: its id and total resources (``ray.nodes()[i]["Resources"]``)."""

    node_id: str
    resources: Mapping[str, float]
    is_head: bool = False

    def amount(self, resource: str) -> float:
        return float(self.resources.get(resource, 0.0))


@dataclass(frozen=True)
class PoolPlacement:
    """How every replica of one pool is reserved: its bundles (one per rank) and strategy."""

    pool: str
    replicas: int
    bundles: tuple[dict[str, float], ...]
    strategy: str = "STRICT_PACK"

    @property
    def world_size(self) -> int:
        return len(self.bundles)

    def need(self, resource: str) -> float:
        return sum(b.get(resource, 0.0) for b in self.bundles)


@dataclass(frozen=True)
class PlacementPlan:
    """Each pool's reservation and where the planner expects each group (``assignments``:
    ``(pool, index) -> node_id``): proof that the groups fit, spread across nodes."""

    accelerator: str
    pools: dict[str, PoolPlacement]
    assignments: dict[tuple[str, int], str] = field(default_factory=dict)

    def nodes_of(self, pool: str) -> list[str]:
        return [node for (p, _i), node in sorted(self.assignments.items()) if p == pool]


def default_accelerator(config: ClusterConfig) -> str:
    """``GPU`` for CUDA configs; CPU configs reserve ``CPU`` per rank."""
    return "GPU" if config.device == "cuda" else "CPU"


def pool_placements(config: ClusterConfig, accelerator: str | None = None,
                    per_rank: float = 1.0) -> dict[str, PoolPlacement]:
    """The per-replica reservation of each pool (no feasibility check: `plan_placement` does it)."""
    acc = accelerator or default_accelerator(config)
    out: dict[str, PoolPlacement] = {}
    for pool in POOLS:
        section = getattr(config, pool)
        bundle = {acc: per_rank} if acc == "CPU" else {acc: per_rank, "CPU": 1.0}
        out[pool] = PoolPlacement(pool, _initial_replicas(section),
                                  tuple(dict(bundle) for _ in range(section.tp * section.pp)))
    return out


def _initial_replicas(section: PrefillPoolConfig | DecodePoolConfig) -> int:
    auto = section.autoscaling
    replicas = section.replicas
    return max(auto.min_replicas, min(replicas, auto.max_replicas)) if auto is not None else replicas


def plan_placement(config: ClusterConfig, nodes: Sequence[NodeResources], *, accelerator: str | None = None,
                   per_rank: float = 1.0) -> PlacementPlan:
    """Plan every pool's groups on ``nodes``; raises `PlacementError` when they cannot fit."""
    acc = accelerator or default_accelerator(config)
    pools = pool_placements(config, acc, per_rank)
    if not nodes:
        raise PlacementError("placement: the Ray cluster has no alive nodes")
    largest = max(n.amount(acc) for n in nodes)
    for p in pools.values():
        if p.replicas and p.need(acc) > largest:
            raise PlacementError(
                f"{p.pool}: a group of tp x pp = {p.world_size} ranks needs {p.need(acc):g} {acc} on one node; "
                f"the largest node has {largest:g}")
    total_need = sum(p.replicas * p.need(acc) for p in pools.values())
    total_have = sum(n.amount(acc) for n in nodes)
    if total_need > total_have:
        parts = " + ".join(f"{p.pool} {p.replicas} x {p.need(acc):g}" for p in pools.values())
        raise PlacementError(f"placement: the groups need {total_need:g} {acc} ({parts}); "
                             f"the cluster has {total_have:g} on {len(nodes)} node(s)")
    return PlacementPlan(acc, pools, _assign(pools, nodes, acc))


def _assign(pools: Mapping[str, PoolPlacement], nodes: Sequence[NodeResources], acc: str) -> dict[tuple[str, int], str]:
    """Largest groups first, each on the node with the most room left (which spreads groups);
    a group that fits nowhere is fragmentation the totals did not show."""
    free = {n.node_id: n.amount(acc) for n in nodes}
    groups = sorted(((p.need(acc), p.pool, i) for p in pools.values() for i in range(p.replicas)),
                    key=lambda g: (-g[0], POOLS.index(g[1]), g[2]))
    out: dict[tuple[str, int], str] = {}
    for need, pool, i in groups:
        node = max(free, key=lambda n: (free[n], -list(free).index(n)))
        if free[node] < need:
            raise PlacementError(
                f"{pool}: group {i} needs {need:g} {acc} on one node; no node has that much left "
                f"(free: {', '.join(f'{k[:8]}={v:g}' for k, v in free.items())})")
        free[node] -= need
        out[(pool, i)] = node
    return out


def nodes_from_ray(ray_nodes: Sequence[Mapping[str, object]]) -> list[NodeResources]:
    """`NodeResources` of the alive entries of ``ray.nodes()``."""
    out = []
    for n in ray_nodes:
        if not n.get("Alive"):
            continue
        resources = dict(n.get("Resources") or {})  # type: ignore[call-overload]
        out.append(NodeResources(str(n["NodeID"]), resources, "node:__internal_head__" in resources))
    return out
