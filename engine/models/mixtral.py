"""Mixture-of-Experts decoders: Mixtral, Qwen2-MoE and Qwen3-MoE in one definition.

They are the Llama family (`engine.models.llama`) with the MLP of some layers replaced by a sparse
block: a router picks ``top_k`` experts per token, their SiLU-gated MLPs run as one grouped GEMM
(`gpu_kernels.ops.fused_moe`), and Qwen2-MoE adds an always-on shared expert behind a sigmoid
gate. Family differences are `engine.moe_config.MoEConfig` switches, attention is Llama's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from engine.config import ModelConfig
from engine.errors import WeightLoadError
from engine.layers.moe import EP_SINGLE, EXPERT_PARTS, ExpertParallel, FusedMoE, Router, route
from engine.layers.norm import RMSNorm
from engine.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from engine.parallel import SINGLE, ParallelGroup

# one expert's projection (safetensors on the Hub) or all experts stacked (transformers >= 5 in memory)
_EXPERT_RE = re.compile(
    r"(?:model\.)?layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\."
    r"(?:(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight|(gate_up_proj|down_proj))"
)


class SparseMoeBlock(nn.Module):
    """Routed experts (+ Qwen2-MoE's gated shared expert) in place of a dense MLP."""

    def __init__(self, cfg: ModelConfig, group: ParallelGroup, ep: ExpertParallel) -> None:
        super().__init__()
        moe = cfg.moe
        assert moe is not None
        self.top_k = moe.top_k
        self.renormalize = moe.norm_topk_prob
        self.gate = Router(cfg.hidden_size, moe.num_experts)
        self.experts = FusedMoE(moe.num_experts, cfg.hidden_size, moe.intermediate_size, ep, group)
        self.shared_expert: LlamaMLP | None = None
        self.shared_expert_gate: Router | None = None
        if moe.has_shared_expert:
            self.shared_expert = LlamaMLP(cfg.replace(intermediate_size=moe.shared_expert_intermediate_size), group)
            self.shared_expert_gate = Router(cfg.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class MoEDecoderLayer(LlamaDecoderLayer):
    """Llama's layer (same forward) whose MLP is sparse where the config says so."""

    def __init__(self, cfg: ModelConfig, group: ParallelGroup, ep: ExpertParallel, index: int) -> None:
        nn.Module.__init__(self)
        assert cfg.moe is not None
        self.self_attn = LlamaAttention(cfg, group)
        self.mlp: nn.Module = SparseMoeBlock(cfg, group, ep) if cfg.moe.is_sparse(index) else LlamaMLP(cfg, group)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MoEForCausalLM(LlamaForCausalLM):
    """``MixtralForCausalLM`` / ``Qwen2MoeForCausalLM`` / ``Qwen3MoeForCausalLM``; experts split over ``ep``."""

    def __init__(
        self,
        cfg: ModelConfig,
        group: ParallelGroup = SINGLE,
        max_positions: int | None = None,
        ep: ExpertParallel = EP_SINGLE,
    ) -> None:
        if cfg.moe is None:
            raise ValueError(f"{cfg.architecture} has no MoE config; it is a dense model")
        ep.local_experts(cfg.moe.num_experts)  # a bad ep fails here, before any allocation
        self.ep = ep
        super().__init__(cfg, group, max_positions)

    def _make_layer(self, cfg: ModelConfig, group: ParallelGroup, index: int) -> nn.Module:
        return MoEDecoderLayer(cfg, group, self.ep, index)

    def _experts(self, layer: int, name: str) -> FusedMoE | None:
        """Layer ``layer``'s experts; None when this rank does not hold the layer (a pipeline placeholder)."""
        if layer >= len(self.layers):
            raise WeightLoadError(f"unexpected checkpoint tensor {name!r}: the model has {len(self.layers)} layers")
        if not isinstance(self.layers[layer], LlamaDecoderLayer):
            return None
        block = self.layers[layer].mlp
        if not isinstance(block, SparseMoeBlock):
            raise WeightLoadError(f"unexpected checkpoint tensor {name!r}: layer {layer} has no experts")
        return block.experts

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """HF names in either expert layout; each rank keeps only its experts. Raises `WeightLoadError`."""
        loaded: set[tuple[int, int, str]] = set()

        def dense() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                m = _EXPERT_RE.fullmatch(name)
                if m is None:
                    yield name.replace(".block_sparse_moe.", ".mlp."), tensor
                    continue
                layer = int(m.group(1))
                experts = self._experts(layer, name)
                if experts is None:
                    continue
                if m.group(4) is not None:  # stacked: every local expert's gate+up, or down
                    part = "gate_up" if m.group(4) == "gate_up_proj" else "down"
                    experts.load_stacked(name, tensor, part)
                    parts = ("gate", "up") if part == "gate_up" else ("down",)
                    loaded.update((layer, e, p) for e in range(experts.num_local) for p in parts)
                    continue
                part = EXPERT_PARTS[m.group(3)]
                if experts.load_expert(name, tensor, int(m.group(2)), part):
                    loaded.add((layer, int(m.group(2)) - experts.first, part))

        super().load_weights(dense())
        blocks = [(i, getattr(layer, "mlp", None)) for i, layer in enumerate(self.layers)]
        expected = {
            (i, e, p)
            for i, block in blocks
            if isinstance(block, SparseMoeBlock)
            for e in range(block.experts.num_local)
            for p in ("gate", "up", "down")
        }
        missing = sorted(expected - loaded)
        if missing:
            raise WeightLoadError(
                f"checkpoint is missing {len(missing)} expert weights, e.g. (layer, local expert, part) {missing[:3]}"
            )

    def _expected_keys(self) -> set[str]:
        expert_mods = {n for n, m in self.named_modules() if isinstance(m, FusedMoE)}
        return {k for k in super()._expected_keys() if k.rsplit(".", 2)[0] not in expert_mods}
