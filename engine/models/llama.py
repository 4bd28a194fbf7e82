"""The Llama family in one definition.

Differences between the families are config flags, not forks: Qwen2 adds QKV bias, Qwen3 adds
per-head q/k RMSNorm, Llama 3.x scales RoPE frequencies, SmolLM2 ties the embeddings.
Tokens arrive flattened (``[T]``, varlen batch); attention state lives in the paged cache.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import ClassVar

import torch
from torch import nn

from engine.attention import LayerKV, paged_attention
from engine.attention_metadata import AttentionMetadata
from engine.config import ModelConfig
from engine.errors import WeightLoadError
from engine.layers.linear import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from engine.layers.norm import RMSNorm
from engine.parallel import SINGLE, ParallelGroup
from gpu_kernels import ops
from gpu_kernels.reference import rope_cos_sin_cache


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, group: ParallelGroup) -> None:
        super().__init__()
        self.num_heads = group.shard(cfg.num_heads, "num_heads")
        self.num_kv_heads = group.local_kv_heads(cfg.num_kv_heads)
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        rep = group.kv_replicas(cfg.num_kv_heads)  # ranks sharing a KV head when tp exceeds them
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size, [cfg.q_size, cfg.kv_size, cfg.kv_size], bias=cfg.attention_bias, group=group,
            replicas=[1, rep, rep],
        )
        self.o_proj = RowParallelLinear(cfg.q_size, cfg.hidden_size, group=group)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        cache: LayerKV,
        meta: AttentionMetadata,
        cos_sin: torch.Tensor,
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.output_sizes, dim=-1)  # x: [T, D]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q)[0]
            k = self.k_norm(k)[0]
        q, _ = ops.rope_and_write_kv(
            q, k, v, positions, cos_sin, cache.kv, meta.slot_mapping, cache.k_scale, cache.v_scale
        )
        o = paged_attention(q, cache, meta, self.scale)  # [T, Hq, Dh]
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, group: ParallelGroup) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size, cfg.intermediate_size], group=group
        )
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, group=group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, group: ParallelGroup) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, group)
        self.mlp = LlamaMLP(cfg, group)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        cache: LayerKV,
        meta: AttentionMetadata,
        cos_sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = h
            h = self.input_layernorm(h)[0]
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(positions, h, cache, meta, cos_sin)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


LayerHook = Callable[[int], None]

_LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


class PipelinePlaceholder(nn.Module):
    """A decoder layer another pipeline stage holds: no weights, never run here."""


class LlamaForCausalLM(nn.Module):
    """``forward(ids [T], positions [T], caches, meta) -> hidden [T, D]``; ``logits(hidden) -> [N, V]``."""

    def __init__(self, cfg: ModelConfig, group: ParallelGroup = SINGLE, max_positions: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.group = group
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, group)
        stage = group.stage_layers(cfg.num_layers)  # pipeline stage: other layers are placeholders
        self.layers = nn.ModuleList(
            self._make_layer(cfg, group, i) if i in stage else PipelinePlaceholder() for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, group)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        n_pos = max_positions or cfg.max_position_embeddings
        cs = rope_cos_sin_cache(cfg.head_dim, n_pos, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("cos_sin", cs, persistent=False)

    def _make_layer(self, cfg: ModelConfig, group: ParallelGroup, index: int) -> nn.Module:
        """Decoder layer ``index``; the MoE models (`engine.models.mixtral`) swap in sparse MLPs here."""
        return LlamaDecoderLayer(cfg, group)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        caches: list[LayerKV],
        meta: AttentionMetadata,
        on_layer_done: LayerHook | None = None,
    ) -> torch.Tensor:
        """``on_layer_done(i)`` fires once layer ``i``'s KV is in the cache (layer-wise transfer)."""
        h = self.embed_tokens(input_ids)  # [T, D]
        residual: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            h, residual = layer(positions, h, residual, caches[i], meta, self.cos_sin)
            if on_layer_done is not None:
                on_layer_done(i)
        return self.norm(h, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # ---- weights -------------------------------------------------------------------------

    _FUSED: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors; raises `WeightLoadError` on an unknown, missing or mis-shaped one."""
        modules = dict(self.named_modules())
        seen: set[str] = set()
        for hf_name, tensor in weights:
            name = re.sub(r"^model\.", "", hf_name)
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue
            if self._other_stage(hf_name):
                continue
            mod_path, _, param = name.rpartition(".")
            owner, _, leaf = mod_path.rpartition(".")
            shard = 0
            if leaf in self._FUSED:
                fused, shard = self._FUSED[leaf]
                mod_path = f"{owner}.{fused}"
            module = modules.get(mod_path)
            if module is None:
                raise WeightLoadError(f"unexpected checkpoint tensor {hf_name!r}")
            key = f"{mod_path}.{param}.{shard}"
            if hasattr(module, "load"):
                module.load(hf_name, tensor, shard, param)
            else:
                target = getattr(module, param, None)
                if not isinstance(target, torch.Tensor):
                    raise WeightLoadError(f"unexpected checkpoint tensor {hf_name!r}")
                if target.shape != tensor.shape:
                    raise WeightLoadError(
                        f"{hf_name}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(target.shape)}"
                    )
                with torch.no_grad():
                    target.copy_(tensor.to(target.dtype))
            seen.add(key)
        missing = sorted(k for k in self._expected_keys() if k not in seen)
        if missing:
            raise WeightLoadError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")

    def _other_stage(self, hf_name: str) -> bool:
        """True for a tensor of a layer another pipeline stage holds."""
        m = _LAYER_RE.match(hf_name)
        i = int(m.group(1)) if m else -1
        return 0 <= i < len(self.layers) and isinstance(self.layers[i], PipelinePlaceholder)

    def _expected_keys(self) -> set[str]:
        keys: set[str] = set()
        for mod_name, module in self.named_modules():
            for pname, _ in module.named_parameters(recurse=False):
                if mod_name == "lm_head" and self.cfg.tie_word_embeddings:
                    continue
                n_shards = len(module.output_sizes) if isinstance(module, ColumnParallelLinear) else 1
                keys.update(f"{mod_name}.{pname}.{s}" for s in range(n_shards))
        return keys

    def init_random_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights of the right scale: exact for speed runs, and a reference for parity runs."""
        gens: dict[torch.device, torch.Generator] = {}
        with torch.no_grad():
            for name, p in self.named_parameters():
                gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
                noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
                p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else noise * std)
