"""Checkpoint loading against transformers, the reference we did not write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import ModelConfig
from engine.errors import ModelNotFoundError, UnsupportedModelError, WeightLoadError
from engine.model_store import default_gguf_path
from engine.weights import config_from_gguf, expected_shapes, iter_checkpoint, resolve_model
from engine.weights.gguf_checkpoint import unpermute_rope_rows

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gguf_path(smollm2_path: Path) -> Path:
    return default_gguf_path()


@pytest.fixture(scope="module")
def hf_gguf_model(gguf_path: Path):
    """transformers' own GGUF loader (dequantize + Q/K un-permutation) on the same file."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )


@pytest.fixture(scope="module")
def gguf_tensors(gguf_path: Path) -> dict[str, torch.Tensor]:
    return dict(iter_checkpoint(gguf_path, progress=False))


def test_gguf_tensors_equal_transformers_gguf_load(gguf_tensors, hf_gguf_model) -> None:
    hf_state = hf_gguf_model.state_dict()
    assert hf_gguf_model.config.tie_word_embeddings
    assert set(gguf_tensors) == set(hf_state) - {"lm_head.weight"}  # tied: one tensor, two names
    for name, tensor in gguf_tensors.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, hf_state[name]), name


def test_config_from_gguf_agrees_with_transformers(gguf_path: Path, hf_gguf_model) -> None:
    ours = config_from_gguf(gguf_path)
    hf = hf_gguf_model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "head_dim"):
        assert ours[key] == getattr(hf, key), key
    assert np.float32(ours["rms_norm_eps"]) == np.float32(hf.rms_norm_eps)
    assert ours["rope_theta"] == hf.rope_parameters["rope_theta"]
    cfg = ModelConfig.from_hf_dict(ours)
    assert (cfg.architecture, cfg.num_layers, cfg.head_dim) == ("LlamaForCausalLM", 30, 64)


def test_converted_folder_equals_gguf(smollm2_path: Path, gguf_tensors) -> None:
    cfg_dict, source = resolve_model(smollm2_path)
    assert source == smollm2_path and cfg_dict["architectures"] == ["LlamaForCausalLM"]
    folder = dict(iter_checkpoint(smollm2_path, progress=False))
    assert folder.keys() == gguf_tensors.keys()
    assert all(torch.equal(folder[k], gguf_tensors[k]) for k in folder)


def test_resolve_model_accepts_a_folder_holding_one_gguf(tmp_path: Path, gguf_path: Path) -> None:
    (tmp_path / gguf_path.name).symlink_to(gguf_path)
    cfg, source = resolve_model(tmp_path)
    assert source == tmp_path / gguf_path.name and cfg["num_hidden_layers"] == 30
    assert resolve_model(gguf_path)[1] == gguf_path


def test_unpermute_inverts_llama_cpp_permute() -> None:
    def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:  # convert_hf_to_gguf.py
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute_rope_rows(llama_cpp_permute(w, 3), 3), w)
    assert not torch.equal(llama_cpp_permute(w, 3), w)


# ---- safetensors folders, from tiny random transformers models ---------------------------------

_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


def _tiny_model(arch: str, dtype: torch.dtype, tie: bool):
    cls_name, cfg_name = {
        "llama": ("LlamaForCausalLM", "LlamaConfig"),
        "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
        "qwen3": ("Qwen3ForCausalLM", "Qwen3Config"),
    }[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(**_TINY, tie_word_embeddings=tie, head_dim=8)
    return getattr(transformers, cls_name)(cfg).to(dtype)


@pytest.mark.parametrize(
    ("arch", "dtype", "tie"),
    [("llama", torch.bfloat16, False), ("qwen2", torch.float16, True), ("qwen3", torch.float32, False)],
)
def test_sharded_safetensors_load_equal(tmp_path: Path, arch: str, dtype: torch.dtype, tie: bool) -> None:
    model = _tiny_model(arch, dtype, tie)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ours = dict(iter_checkpoint(tmp_path, progress=False))
    state = {k: v for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    assert ours.keys() == state.keys()
    for name, tensor in ours.items():
        assert tensor.dtype == dtype and torch.equal(tensor, state[name]), name
    assert any(".q_norm." in k for k in ours) == (arch == "qwen3")
    assert any(k.endswith("q_proj.bias") for k in ours) == (arch == "qwen2")
    assert set(ours) == set(expected_shapes(ModelConfig.from_model_dir(tmp_path)))


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    _tiny_model("llama", torch.float32, False).save_pretrained(tmp_path / "m", max_shard_size="20KB")
    return tmp_path / "m"


def _edit_config(folder: Path, **changes: object) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **changes}))


def test_missing_paths_raise_model_not_found(tmp_path: Path, tiny_folder: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        iter_checkpoint(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError):
        resolve_model(tmp_path / "nope.gguf")
    with pytest.raises(ModelNotFoundError):
        iter_checkpoint(tmp_path)  # a folder with neither config.json nor a .gguf
    shard = sorted(tiny_folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ModelNotFoundError, match=shard.name):
        iter_checkpoint(tiny_folder)
    for f in tiny_folder.glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(ModelNotFoundError, match=r"model\.safetensors"):
        iter_checkpoint(tiny_folder)


def test_shape_mismatch_names_the_tensor(tiny_folder: Path) -> None:
    _edit_config(tiny_folder, intermediate_size=48)
    with pytest.raises(WeightLoadError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight"):
        list(iter_checkpoint(tiny_folder, progress=False))


def test_given_config_is_checked_against_the_weights(tiny_folder: Path) -> None:
    cfg = ModelConfig.from_model_dir(tiny_folder).replace(num_layers=3)
    with pytest.raises(WeightLoadError, match="missing"):
        list(iter_checkpoint(tiny_folder, cfg, progress=False))
    cfg = ModelConfig.from_model_dir(tiny_folder).replace(num_layers=1)
    with pytest.raises(WeightLoadError, match=r"unexpected tensor 'model\.layers\.1\."):
        list(iter_checkpoint(tiny_folder, cfg, progress=False))


def test_unsupported_architecture(tiny_folder: Path, tmp_path: Path) -> None:
    _edit_config(tiny_folder, architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        iter_checkpoint(tiny_folder)
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        resolve_model(path)


# ---- GGUF files we write ourselves: names, bias/qk-norm mapping, F16, permutation -------------

_GGUF_LEAF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, _, param = rest.rpartition(".")
    return f"blk.{layer}.{_GGUF_LEAF[module]}.{param}"


def _write_gguf(path: Path, arch: str, model, f16: bool) -> None:
    """What llama.cpp's converter does, minus quantization: rename, permute Q/K for llama."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(c.vocab_size)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.float().numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            n = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
            a = a.reshape(n, 2, a.shape[0] // n // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        if f16 and a.ndim == 2:
            a = a.astype(np.float16)
        w.add_tensor(_gguf_name(name), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(("arch", "f16"), [("llama", True), ("qwen2", False), ("qwen3", False)])
def test_gguf_round_trip(tmp_path: Path, arch: str, f16: bool) -> None:
    model = _tiny_model(arch, torch.float32, tie=arch == "qwen2")
    path = tmp_path / f"{arch}.gguf"
    _write_gguf(path, arch, model, f16)
    cfg = config_from_gguf(path)
    assert cfg["architectures"] == [type(model).__name__]
    assert cfg["tie_word_embeddings"] == (arch == "qwen2")
    state = model.state_dict()
    ours = dict(iter_checkpoint(path, progress=False))
    assert ours.keys() == (state.keys() - ({"lm_head.weight"} if arch == "qwen2" else set()))
    for name, tensor in ours.items():
        want = state[name].half().float() if f16 and tensor.ndim == 2 else state[name]
        assert torch.equal(tensor, want), name


def test_gguf_copy_with_wrong_shape_names_the_tensor(tmp_path: Path) -> None:
    model = _tiny_model("qwen3", torch.float32, tie=False)
    path = tmp_path / "m.gguf"
    _write_gguf(path, "qwen3", model, f16=False)
    cfg = ModelConfig.from_hf_dict(config_from_gguf(path)).replace(intermediate_size=80)
    with pytest.raises(WeightLoadError, match=r"blk|model\.layers\.0\.mlp"):
        list(iter_checkpoint(path, cfg, progress=False))
    shutil.copy(path, tmp_path / "x.bin")
    with pytest.raises(ModelNotFoundError):
        resolve_model(tmp_path / "x.bin")
