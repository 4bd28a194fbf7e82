"""How `splitserve serve` turns a cluster config into worker processes (no process started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ConfigError, config_from_dict, load_config
from splitserve.serve import worker_specs

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_local_example_maps_to_one_prefill_and_one_decode_worker() -> None:
    config = load_config(DEPLOY / "local.yaml")
    specs = worker_specs(config, "/models/smol")
    assert [(s.role, s.worker_id) for s in specs] == [("prefill", "prefill-0"), ("decode", "decode-0")]
    for s in specs:
        assert s.model == "/models/smol" and s.transport == "tcp" and s.device == "cpu"
        assert s.block_size == config.block_size and s.max_model_len == config.max_model_len
        assert s.kv_cache_memory == int(config.kv_cache_memory)
        assert s.max_num_batched_tokens == config.prefill.chunk_size  # block-aligned chunks
        assert s.num_threads >= 1  # CPU cores shared out between the worker processes
        assert s.transfer_timeout_s == config.kvtransfer.transfer_timeout_s
    assert specs[1].max_num_seqs == config.decode.max_num_seqs


def test_two_prefill_example_and_overrides() -> None:
    specs = worker_specs(load_config(DEPLOY / "two-prefill.yaml"), "/m", {"lease_s": 4.0})
    assert [s.worker_id for s in specs] == ["prefill-0", "prefill-1", "decode-0"]
    assert {s.transport for s in specs} == {"nixl"} and {s.lease_s for s in specs} == {4.0}


def test_sharded_groups_move_kv_rank_to_rank_but_not_over_nixl() -> None:
    """NIXL posts prepared per-block descriptors: head slices between groups need tcp or ucxx."""
    config = load_config(DEPLOY / "llama3-8b-h100.yaml")
    specs = worker_specs(config, "/m")
    assert {(s.role, s.tp_size, s.kv_groups, s.transport) for s in specs} == {
        ("prefill", 2, True, "ucxx"), ("decode", 2, True, "ucxx")}
    nixl = config.to_dict()
    nixl["kvtransfer"]["backend"] = "nixl"
    with pytest.raises(ConfigError, match=r"kvtransfer\.backend: 'nixl' cannot move KV between sharded"):
        worker_specs(config_from_dict(nixl), "/m")
