"""Serve autoscaling for a worker pool, driven by the load the workers report.

Serve's default policy counts requests that pass through Serve, but requests reach workers over
gRPC from the router, so each `WorkerReplica` reports its own ``load`` (running + queued
sequences, `record_autoscaling_stats`) and `PoolLoadPolicy` asks for enough replicas to keep
each near ``target``. Serve applies the bounds and the up/down delays of the pool's
``autoscaling:`` block around it.
"""

from __future__ import annotations

import math
from typing import Any

from cluster.config import AutoscalingPoolConfig

POLICY_PATH = "splitserve.ray_deploy.autoscaling:PoolLoadPolicy"


class PoolLoadPolicy:
    """``ceil(total load / target)`` replicas; no metric yet keeps the current count."""

    def __init__(self, target: float) -> None:
        self.target = target

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        per_replica = (ctx.aggregated_metrics or {}).get("load")
        if not per_replica:
            return ctx.current_num_replicas, {}
        total = sum(per_replica.values())
        return math.ceil(total / self.target), {}


def serve_autoscaling_config(auto: AutoscalingPoolConfig, initial: int) -> dict[str, Any]:
    """The pool's ``autoscaling:`` block as Serve's ``autoscaling_config``."""
    return {
        "min_replicas": auto.min_replicas,
        "max_replicas": auto.max_replicas,
        "initial_replicas": initial,
        "upscale_delay_s": auto.upscale_delay_s,
        "downscale_delay_s": auto.downscale_delay_s,
        "policy": {"policy_function": POLICY_PATH, "policy_kwargs": {"target": auto.target_load_per_replica}},
    }
