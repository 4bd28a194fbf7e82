"""The Hugging Face tensor layout of a Llama-family checkpoint, derived from `ModelConfig`.

Every checkpoint source (safetensors folder, GGUF file) is checked against this one table, so
a wrong file fails at load time with the tensor's name instead of deep inside a matmul.
"""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.errors import WeightLoadError
from engine.weights.moe_layout import moe_block_shapes

# Tensors some exporters write that carry no weights (recomputed at run time): skipped, not errors.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape for every tensor the model needs (``lm_head`` only when untied)."""
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (q, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, q),
        }
        if cfg.moe is not None and cfg.moe.is_sparse(i):
            shapes |= moe_block_shapes(cfg, p)
        else:
            shapes |= {
                f"{p}.mlp.gate_proj.weight": (inter, h),
                f"{p}.mlp.up_proj.weight": (inter, h),
                f"{p}.mlp.down_proj.weight": (h, inter),
            }
        if cfg.attention_bias:
            shapes |= {
                f"{p}.self_attn.q_proj.bias": (q,),
                f"{p}.self_attn.k_proj.bias": (kv,),
                f"{p}.self_attn.v_proj.bias": (kv,),
            }
        if cfg.qk_norm:
            shapes |= {
                f"{p}.self_attn.q_norm.weight": (cfg.head_dim,),
                f"{p}.self_attn.k_norm.weight": (cfg.head_dim,),
            }
    return shapes


class LayoutChecker:
    """Checks tensors one at a time as they stream past, then that none was missing.

    A checkpoint is streamed (never held whole in memory), so the check has to be incremental.
    """

    def __init__(self, cfg: ModelConfig, source: str) -> None:
        self.cfg = cfg
        self.source = source
        self.shapes = expected_shapes(cfg)
        self.seen: set[str] = set()

    def accept(self, name: str, tensor: torch.Tensor) -> bool:
        """True to yield the tensor, False to skip it; raises `WeightLoadError` when it is wrong."""
        if name.endswith(IGNORED_SUFFIXES):
            return False
        if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return False  # some exporters save the tied copy too; the model reuses the embedding
        want = self.shapes.get(name)
        if want is None:
            raise WeightLoadError(f"{self.source}: unexpected tensor {name!r} for {self.cfg.architecture}")
        if tuple(tensor.shape) != want:
            raise WeightLoadError(
                f"{self.source}: tensor {name!r} has shape {tuple(tensor.shape)}, the config expects {want}"
            )
        if name in self.seen:
            raise WeightLoadError(f"{self.source}: tensor {name!r} appears twice")
        self.seen.add(name)
        return True

    def finish(self) -> None:
        missing = [n for n in self.shapes if n not in self.seen]
        if missing:
            raise WeightLoadError(
                f"{self.source}: {len(missing)} tensors missing, e.g. {missing[:3]}"
            )
