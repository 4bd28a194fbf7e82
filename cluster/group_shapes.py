"""Do the pools' worker-group shapes fit the model and this machine? Checked before any process starts.

`ClusterConfig` alone cannot know the model's heads, layers and experts; once the model folder is
known (`splitserve.serve.worker_groups`) these checks run and raise `ConfigError` naming the field.
"""

from __future__ import annotations

from cluster.config import ClusterConfig, ConfigError
from engine.config import ModelConfig
from engine.distributed.shapes import GroupShapeError, check_group_shape


def check_pairing(config: ClusterConfig) -> None:
    """KV transfer between sharded groups is not wired yet: sharded pools run without prefill workers."""
    sharded = [f"{pool}.tp/{pool}.pp" for pool in ("prefill", "decode") if getattr(config, pool).world_size > 1]
    if config.prefill.replicas and sharded:
        raise ConfigError(
            f"{sharded[0]}: KV transfer between sharded (tp x pp > 1) groups is not supported yet; "
            "use prefill.replicas: 0 (decode groups then prefill their prompts themselves)"
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
