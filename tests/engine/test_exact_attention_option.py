"""The ``exact_attention`` option reaches the attention ops from every place a user sets it."""

from __future__ import annotations

import pytest

from cluster.config import ClusterConfig
from engine import LLM, SamplingParams
from engine import attention as engine_attention
from gpu_kernels import ops
from splitserve.serve import worker_specs


@pytest.fixture
def seen_modes(monkeypatch) -> list[bool]:
    """Record the exact-attention mode in force at every attention call of the model."""
    seen: list[bool] = []
    for name in ("paged_decode_attention", "paged_context_attention"):
        real = getattr(ops, name)

        def spy(*a, _real=real, **kw):
            seen.append(ops._EXACT_ATTENTION.get())
            return _real(*a, **kw)

        monkeypatch.setattr(engine_attention.ops, name, spy)
    return seen


@pytest.mark.parametrize(("option", "ambient"), [(False, False), (True, False), (False, True)])
def test_llm_option_sets_the_mode_for_every_attention_call(smollm2_path, seen_modes, option, ambient):
    """The engine option turns exact mode on; without it, a caller's `ops.exact_attention` stands."""
    llm = LLM(smollm2_path, max_model_len=256, exact_attention=option)
    with ops.exact_attention(ambient):
        out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=3, temperature=0.0))
    assert len(out[0].outputs[0].token_ids) == 3
    assert len(seen_modes) == 30 * 3  # 30 layers: one prefill step and two decode steps
    assert set(seen_modes) == {option or ambient}
    assert not ops._EXACT_ATTENTION.get()  # nothing leaks out


def test_cluster_config_reaches_the_workers_engine_config(smollm2_path):
    cfg = ClusterConfig(model=str(smollm2_path), exact_attention=True)
    specs = worker_specs(cfg, str(smollm2_path))
    assert specs and all(s.exact_attention and s.engine_config().exact_attention for s in specs)
    default = worker_specs(ClusterConfig(model=str(smollm2_path)), str(smollm2_path))
    assert not any(s.engine_config().exact_attention for s in default)
