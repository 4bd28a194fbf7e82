"""KV budget arithmetic (`engine.kv_budget`) and its configuration checks."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig, ModelConfig
from engine.kv_budget import (
    KVBudgetError,
    StepShape,
    activation_bytes,
    kv_cache_bytes,
    non_kv_reserve,
    sampler_bytes,
)

GIB = 2**30
LLAMA_8B = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
)


def test_budget_is_utilization_less_used_less_reserve() -> None:
    # an 80 GiB card, 16 GiB in use after the weights, 2 GiB kept: 0.9 * 80 - 16 - 2 = 54 GiB
    assert kv_cache_bytes(80 * GIB, 64 * GIB, 2 * GIB, 0.9) == int(0.9 * 80 * GIB) - 16 * GIB - 2 * GIB


def test_other_processes_count_against_the_share() -> None:
    alone = kv_cache_bytes(80 * GIB, 64 * GIB, GIB, 0.9)
    shared = kv_cache_bytes(80 * GIB, 54 * GIB, GIB, 0.9)  # someone else holds 10 GiB
    assert alone - shared == 10 * GIB


@pytest.mark.parametrize("u", [0.0, -0.1, 1.5])
def test_utilization_out_of_range_names_the_field(u: float) -> None:
    with pytest.raises(KVBudgetError, match="gpu_memory_utilization"):
        kv_cache_bytes(80 * GIB, 64 * GIB, 0, u)


def test_no_room_left_is_a_named_error() -> None:
    with pytest.raises(KVBudgetError, match=r"gpu_memory_utilization: 0.2 .* leaves no room"):
        kv_cache_bytes(80 * GIB, 64 * GIB, GIB, 0.2)


def test_reserve_terms() -> None:
    bf16 = torch.bfloat16
    per_token = 2 * 4096 + 4096 + 2 * 1024 + 3 * 14336
    assert activation_bytes(LLAMA_8B, bf16, 1) == int(per_token * 2 * 2.0)
    assert sampler_bytes(LLAMA_8B, 256) == 256 * 128256 * (6 * 4 + 5)
    shape = StepShape(max_num_batched_tokens=8192, max_num_seqs=256)
    eager = non_kv_reserve(LLAMA_8B, bf16, shape, cuda_graphs=False)
    graphs = non_kv_reserve(LLAMA_8B, bf16, shape, cuda_graphs=True)
    assert graphs - eager == activation_bytes(LLAMA_8B, bf16, 256)
    assert 1 * GIB < eager < 6 * GIB  # plausible for an 8B model at 8K tokens per step


@pytest.mark.parametrize("u", [0, 1.01, True, "0.9"])
def test_engine_config_checks_the_field(u: object) -> None:
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(model="m", gpu_memory_utilization=u)  # type: ignore[arg-type]
    assert EngineConfig(model="m", gpu_memory_utilization=0.9).gpu_memory_utilization == 0.9


@pytest.mark.parametrize("pool", ["prefill", "decode"])
def test_cluster_config_pool_field_is_checked_and_carried(pool: str) -> None:
    from cluster.config import ConfigError, config_from_dict
    from splitserve.serve import worker_specs

    with pytest.raises(ConfigError, match=rf"{pool}\.gpu_memory_utilization"):
        config_from_dict({pool: {"gpu_memory_utilization": 1.5}})
    cfg = config_from_dict({pool: {"gpu_memory_utilization": 0.85}, "decode": {"cuda_graphs": False}}
                           if pool == "prefill" else {pool: {"gpu_memory_utilization": 0.85, "cuda_graphs": False}})
    specs = {s.role: s for s in worker_specs(cfg, "model")}
    assert specs[pool].gpu_memory_utilization == 0.85
    assert not specs["decode"].cuda_graphs and not specs["prefill"].cuda_graphs
    assert not specs["decode"].overlap_scheduling
    on = config_from_dict({"decode": {"overlap_scheduling": True}})
    assert [s.overlap_scheduling for s in worker_specs(on, "model")] == [False, True]
