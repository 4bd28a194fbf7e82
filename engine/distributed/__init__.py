"""Sharded worker groups: tensor and pipeline parallel ranks of one engine.

Rank 0 schedules and samples; every other rank follows its step plan (`plan`), runs its shard of
the model (`stage`) and holds the KV of its heads and layers. See docs/parallelism.md.
"""

from engine.distributed.world import World, close_world, current_world, init_world

__all__ = ["World", "close_world", "current_world", "init_world"]
