"""Sharded pools are checked against the model before any process starts; errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ConfigError, config_from_dict
from cluster.group_shapes import check_model_shapes
from engine.config import ModelConfig
from splitserve.serve import worker_groups
from tests.engine.parallel_models import save_tiny_llama, save_tiny_mixtral


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))  # 4 heads, 2 KV heads, 4 layers


def _config(**sections: dict) -> object:
    return config_from_dict({"kvtransfer": {"backend": "tcp"}, "prefill": {"replicas": 0}, **sections})


def test_a_decode_group_becomes_its_rank_specs(llama: Path) -> None:
    [group] = worker_groups(_config(decode={"tp": 2, "pp": 2}), str(llama))
    assert (group.tp, group.pp, group.world_size) == (2, 2, 4)
    ranks = [(s.tp_rank, s.pp_rank, s.tp_size, s.pp_size) for s in group.ranks]
    assert ranks == [(0, 0, 2, 2), (1, 0, 2, 2), (0, 1, 2, 2), (1, 1, 2, 2)]
    assert [s.worker_id for s in group.ranks] == ["decode-0", "decode-0-rank1", "decode-0-rank2", "decode-0-rank3"]
    assert {s.num_threads for s in group.ranks} == {1}  # the cores are shared by all four ranks


@pytest.mark.parametrize(("decode", "field"), [
    ({"tp": 3}, "decode.tp = 3 does not divide"),
    ({"pp": 5}, "decode.pp = 5 stages exceed the model's 4 layers"),
    ({"tp": 8}, "decode.tp = 8 does not divide"),  # 4 heads
])  # fmt: skip
def test_shapes_the_model_cannot_take_are_refused(llama: Path, decode: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        worker_groups(_config(decode=decode), str(llama))


def test_experts_must_split_over_ep(tmp_path: Path) -> None:
    mixtral = save_tiny_mixtral(tmp_path / "mixtral")  # 4 experts
    cfg = ModelConfig.from_model_dir(mixtral)
    check_model_shapes(_config(decode={"tp": 2, "ep": 2}), cfg, None)
    with pytest.raises(ConfigError, match=r"decode\.ep = 2 must be 1 or equal decode\.tp"):
        check_model_shapes(_config(decode={"tp": 4, "ep": 2}), cfg, None)


def test_more_ranks_than_gpus_is_refused(llama: Path) -> None:
    cfg = ModelConfig.from_model_dir(llama)
    with pytest.raises(ConfigError, match=r"decode.tp/decode.pp: a group of 2 x 2 = 4 ranks .* has 2"):
        check_model_shapes(_config(decode={"tp": 2, "pp": 2}), cfg, num_gpus=2)


def test_sharded_pools_with_prefill_workers_move_kv_rank_to_rank(llama: Path) -> None:
    groups = worker_groups(_config(prefill={"replicas": 1, "tp": 2}, decode={"tp": 2}), str(llama))
    assert {s.kv_groups for g in groups for s in g.ranks} == {True}
    [group] = worker_groups(_config(decode={"tp": 2}), str(llama))  # no prefill workers: as before
    assert not group.ranks[0].kv_groups


def test_kv_between_groups_needs_a_byte_range_transport(llama: Path) -> None:
    cfg = config_from_dict({"kvtransfer": {"backend": "nixl"}, "prefill": {"replicas": 1}, "decode": {"tp": 2}})
    with pytest.raises(ConfigError, match=r"kvtransfer\.backend: 'nixl' cannot move KV between sharded"):
        worker_groups(cfg, str(llama))
