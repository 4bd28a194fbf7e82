"""Do the pools' worker-group shapes fit the model and this machine? Checked before any process starts.

`ClusterConfig` alone cannot know the model's heads, layers and experts; once the model folder is
known (`splitserve.serve.worker_groups`) these checks run and raise `ConfigError` naming the field.
"""

from __future__ import annotations

from cluster.config import ClusterConfig, ConfigError
from engine.config import ModelConfig
from engine.distributed.shapes import GroupShapeError, check_group_shape

GROUP_TRANSPORTS = ("tcp", "ucxx")  # post head-tile byte ranges (`KVTransport.write_ranges`) between any ranks


def kv_groups(config: ClusterConfig) -> bool:
    """Prefill workers feeding a sharded pool (or fed by one): every rank moves its own KV slices."""
    return bool(config.prefill.replicas) and any(
        getattr(config, pool).world_size > 1 for pool in ("prefill", "decode"))


def check_pairing(config: ClusterConfig) -> None:
    """KV between groups of different tp/pp moves rank to rank as head-tile slices: only
    transports that post arbitrary byte ranges between any two ranks can carry it."""
    if kv_groups(config) and config.kvtransfer.backend not in GROUP_TRANSPORTS:
        raise ConfigError(
            f"kvtransfer.backend: {config.kvtransfer.backend!r} cannot move KV between sharded (tp x pp > 1) "
            f"groups and prefill workers; use one of {', '.join(GROUP_TRANSPORTS)}, or prefill.replicas: 0"
        )


def check_model_shapes(config: ClusterConfig, model: ModelConfig, num_gpus: int | None) -> None:
    """Heads, KV heads, layers and experts must split over each pool's tp/pp/ep; ranks need GPUs."""
    pools = [("decode", config.decode.ep)] + ([("prefill", 1)] if config.prefill.replicas else [])
    for pool, ep in pools:
        section = getattr(config, pool)
        try:
            check_group_shape(model, section.tp, section.pp, ep, fields=(f"{pool}.tp", f"{pool}.pp", f"{pool}.ep"))
        except GroupShapeError as e:
            raise ConfigError(str(e)) from None
        if num_gpus is not None and section.world_size > num_gpus:
            raise ConfigError(
                f"{pool}.tp/{pool}.pp: a group of {section.tp} x {section.pp} = {section.world_size} ranks needs as "
                f"many GPUs (one per rank), this machine has {num_gpus}"
            )
