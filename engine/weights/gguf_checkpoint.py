"""Streaming a GGUF file's tensors as dequantized, HF-named float32 tensors.

Two things differ from an HF checkpoint besides quantization: llama.cpp's tensor names, and, for
the "llama" architecture, a row permutation of Q and K. llama.cpp's converter reorders each head's
rows from HF's rotate-half rope layout (first half / second half) to interleaved pairs; we undo it
exactly as transformers' GGUF loader does, so both see the same weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from engine.errors import WeightLoadError

# llama.cpp leaf name -> HF module path inside a decoder layer
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# Architectures whose llama.cpp converter permutes Q/K rows (its LlamaModel and subclasses).
_PERMUTED_ARCHS = frozenset({"llama"})


def hf_name(gguf_name: str) -> str:
    """The transformers name of a GGUF tensor; raises `WeightLoadError` for one we have no slot for."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise WeightLoadError(f"unexpected GGUF tensor {gguf_name!r}")


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's ``permute``: per head, rows (d/2, 2) interleaved -> (2, d/2) halves."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise WeightLoadError(f"Q/K rows {rows} do not split into {n_head} rope heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dequantize(tensor: object) -> torch.Tensor:
    """One reader tensor as float32, shaped like HF's (out, in); copies out of the memory map."""
    from gguf.quants import dequantize as gguf_dequantize

    try:
        arr = gguf_dequantize(tensor.data, tensor.tensor_type)  # type: ignore[attr-defined]
    except NotImplementedError as e:
        raise WeightLoadError(f"{tensor.name}: cannot dequantize {tensor.tensor_type.name}: {e}") from e  # type: ignore[attr-defined]
    arr = np.asarray(arr, dtype=np.float32)
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, dtype=np.float32, order="C")  # F32 tensors come back as read-only mmap views
    return torch.from_numpy(arr)


def iter_gguf(path: Path, arch: str, num_heads: int, num_kv_heads: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every tensor of the file, in file order."""
    from engine.weights.gguf_file import open_gguf

    reader = open_gguf(path)
    permute = arch in _PERMUTED_ARCHS
    for t in reader.tensors:
        name = hf_name(t.name)
        w = dequantize(t)
        if permute and name.endswith(".weight"):
            if ".self_attn.q_proj." in name:
                w = unpermute_rope_rows(w, num_heads)
            elif ".self_attn.k_proj." in name:
                w = unpermute_rope_rows(w, num_kv_heads)
        yield name, w


def num_tensors(path: Path) -> int:
    from engine.weights.gguf_file import open_gguf

    return len(open_gguf(path).tensors)
