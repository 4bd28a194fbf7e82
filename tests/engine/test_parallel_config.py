"""`ParallelConfig`: validated once, frozen, and the source of the model group and the KV compat key."""

from __future__ import annotations

import dataclasses

import pytest

from engine.config import EngineConfig, ParallelConfig
from engine.parallel import ParallelGroup
from protocol.worker_spec import WorkerSpec, WorkerSpecError
from worker_runtime.runtime import compat_key


def test_defaults_are_one_rank_and_frozen() -> None:
    cfg = EngineConfig(model="m")
    assert cfg.parallel == ParallelConfig(1, 1, 0, 0, 1)
    assert cfg.parallel.world_size == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.parallel.tp_size = 2  # type: ignore[misc]


@pytest.mark.parametrize(("kw", "field"), [
    ({"tp_size": 0}, "tp_size"), ({"tp_rank": 1}, "tp_rank"), ({"tp_size": 2, "tp_rank": -1}, "tp_rank"),
    ({"pp_size": 0}, "pp_size"), ({"pp_rank": 1}, "pp_rank"), ({"tp_size": True}, "tp_size"),
    ({"tp_size": 2, "ep_size": 3}, "ep_size"),
])  # fmt: skip
def test_bad_values_name_the_field(kw: dict[str, int], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ParallelConfig(**kw)


def test_model_group_comes_from_the_config() -> None:
    assert ParallelGroup.from_config(ParallelConfig()) == ParallelGroup(0, 1)
    with pytest.raises(ValueError, match="tp_size"):  # no process group in this process
        ParallelGroup.from_config(ParallelConfig(tp_size=2, tp_rank=1))


def test_worker_spec_carries_the_split_into_engine_and_compat_key(smollm2_path) -> None:
    spec = WorkerSpec(role="decode", model=str(smollm2_path))
    assert spec.engine_config().parallel == ParallelConfig()
    key = compat_key(spec)
    assert (key["tp_size"], key["tp_rank"], key["pp_size"], key["pp_rank"]) == (1, 0, 1, 0)
    assert compat_key(spec.replace(tp_size=2, tp_rank=1))["tp_rank"] == 1  # sharding = configuration
    with pytest.raises(WorkerSpecError, match="tp_rank"):
        WorkerSpec(role="decode", model="m", tp_rank=3)
