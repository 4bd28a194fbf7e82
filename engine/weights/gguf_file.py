"""Reading a GGUF file's metadata, and the HF ``config.json`` it implies.

GGUF keeps what HF splits over config.json, tokenizer.json and tokenizer_config.json in one
key/value table (llama.cpp's names). This module is the only place that knows those names.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ModelNotFoundError, UnsupportedModelError

# general.architecture -> (HF architecture, HF model_type). llama.cpp writes Mistral models as
# "llama" (same math; it has no sliding window either), so they load as LlamaForCausalLM.
GGUF_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}


def open_gguf(path: str | Path) -> Any:
    """A (cached) `gguf.GGUFReader`; parsing the header of a 100 MB file takes ~2 s, so reuse it."""
    p = Path(path)
    if not p.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {p}")
    st = p.stat()
    return _open_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, mtime_ns: int, size: int) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as e:  # wrong magic, truncated file
        raise ModelNotFoundError(f"{path}: not a readable GGUF file ({e})") from e


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Every key/value of the file as plain Python values (str, int, float, bool, list)."""
    reader = open_gguf(path)
    return {name: field_value(field) for name, field in reader.fields.items()}


def field_value(field: Any) -> Any:
    """Decode one `ReaderField` without `ReaderField.contents()`, which older gguf releases lack."""
    import gguf

    types = list(field.types)
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        items = [field.parts[i] for i in field.data]
        if types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(x).decode("utf-8") for x in items]
        return [_scalar(x, types[-1]) for x in items]
    part = field.parts[field.data[0]]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return _scalar(part, types[0])


def _scalar(part: np.ndarray, vtype: Any) -> Any:
    import gguf

    v = part[0]
    if vtype == gguf.GGUFValueType.BOOL:
        return bool(v)
    if vtype == gguf.GGUFValueType.FLOAT32:
        return float(str(v))  # shortest float32 spelling: 1e-05, not 9.999999747378752e-06
    if vtype == gguf.GGUFValueType.FLOAT64:
        return float(v)
    return int(v)


def gguf_architecture(metadata: dict[str, Any]) -> str:
    arch = metadata.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; supported: {sorted(GGUF_ARCHITECTURES)}"
        )
    return str(arch)


def config_from_gguf(path: str | Path) -> dict[str, Any]:
    """An HF-style config.json dict built from the file's metadata (and its tensor list)."""
    md = read_metadata(path)
    arch = gguf_architecture(md)
    hf_arch, model_type = GGUF_ARCHITECTURES[arch]
    tensor_names = {t.name for t in open_gguf(path).tensors}
    if "rope_freqs.weight" in tensor_names:
        # llama.cpp bakes Llama-3.1-style rope scaling into per-frequency factors; recovering the
        # HF rope_scaling dict from them is guesswork, and ignoring them gives silently wrong output.
        raise UnsupportedModelError(
            f"{path}: GGUF carries rope_freqs (Llama 3.1 rope scaling); load the HF model folder instead"
        )

    def key(name: str, default: Any = None) -> Any:
        return md.get(f"{arch}.{name}", default)

    if key("expert_count"):  # llama.cpp writes Mixtral as "llama" plus experts: refuse it by name
        raise UnsupportedModelError(
            f"{path}: a Mixture-of-Experts GGUF ({key('expert_count')} experts); "
            "MoE models load from their HF safetensors folder"
        )

    hidden = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    num_kv = key("attention.head_count_kv", num_heads)
    if isinstance(num_kv, list):  # per-layer counts: only uniform ones describe a plain transformer
        if len(set(num_kv)) != 1:
            raise UnsupportedModelError(f"{path}: per-layer KV head counts {sorted(set(num_kv))}")
        num_kv = num_kv[0]
    head_dim = key("attention.key_length") or key("rope.dimension_count") or hidden // num_heads
    tokens = md.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise UnsupportedModelError(f"{path}: GGUF states no vocab size and carries no tokenizer")
    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(num_kv),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 4096)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
    }
    if model_type == "qwen2":
        cfg["attention_bias"] = True
    scaling = key("rope.scaling.type")
    if scaling not in (None, "none"):
        # ModelConfig decides what it supports; hand it the HF spelling so its error names it.
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": key("rope.scaling.factor")}
    for hf_key, gguf_key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        value = md.get(f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            cfg[hf_key] = int(value)
    return cfg
