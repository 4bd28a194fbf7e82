"""Shard on load: a rank of a tp/pp group reads only its slices of a (sharded) safetensors checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from engine.model_loader import load_model
from engine.models.llama import PipelinePlaceholder
from engine.parallel import ParallelGroup
from engine.weights.lazy_tensor import LazySlice
from tests.engine.parallel_models import LLAMA, save_tiny_llama


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """The tiny Llama saved as several shards with a ``model.safetensors.index.json``."""
    path = save_tiny_llama(tmp_path_factory.mktemp("one"))
    model = transformers.LlamaForCausalLM.from_pretrained(path)
    out = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(out, max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("*.safetensors"))) > 2
    return out


def _load(path: Path, group: ParallelGroup) -> tuple[torch.nn.Module, int]:
    before = LazySlice.bytes_read
    _, model = load_model(path, torch.float32, "cpu", group=group)
    return model, LazySlice.bytes_read - before


def _total_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_tp_rank_reads_its_slice(sharded: Path) -> None:
    _, full = load_model(sharded, torch.float32, "cpu")
    model, read = _load(sharded, ParallelGroup(tp_rank=1, tp_size=2))
    assert read < 0.6 * _total_bytes(full)  # half of every split weight, plus the small replicated ones
    kv = LLAMA["hidden_size"] // LLAMA["num_attention_heads"] * LLAMA["num_key_value_heads"] // 2
    q = LLAMA["hidden_size"] // 2
    full_qkv = full.layers[2].self_attn.qkv_proj.weight
    want = torch.cat([full_qkv[q : 2 * q], full_qkv[2 * q + kv : 2 * q + 2 * kv], full_qkv[-kv:]])
    torch.testing.assert_close(model.layers[2].self_attn.qkv_proj.weight, want, rtol=0, atol=0)
    down = full.layers[3].mlp.down_proj.weight
    torch.testing.assert_close(model.layers[3].mlp.down_proj.weight, down[:, down.shape[1] // 2 :], rtol=0, atol=0)


def test_pp_stage_reads_only_its_layers(sharded: Path) -> None:
    _, full = load_model(sharded, torch.float32, "cpu")
    model, read = _load(sharded, ParallelGroup(pp_rank=1, pp_size=2))
    assert [isinstance(layer, PipelinePlaceholder) for layer in model.layers] == [True, True, False, False]
    layer_bytes = _total_bytes(full.layers[0])
    assert read <= _total_bytes(full) - 2 * layer_bytes  # layers 0 and 1 are never read
    for i in (2, 3):
        for (name, got), want in zip(model.layers[i].named_parameters(), full.layers[i].parameters()):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def test_lazy_slice_refuses_a_narrow_outside_the_tensor(sharded: Path) -> None:
    from safetensors import safe_open

    first = sorted(sharded.glob("*.safetensors"))[0]
    with safe_open(str(first), framework="pt") as f:
        name = next(iter(f.keys()))
        lazy = LazySlice(f.get_slice(name))
        torch.testing.assert_close(lazy.narrow(0, 1, 2).to(), f.get_tensor(name)[1:3])
        with pytest.raises(IndexError, match="narrow"):
            lazy.narrow(0, lazy.shape[0] - 1, 2)
