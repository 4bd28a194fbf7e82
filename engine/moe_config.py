"""The Mixture-of-Experts part of a model's config, one shape for every MoE family.

Mixtral, Qwen2-MoE and Qwen3-MoE name the same few numbers differently (and Mixtral hard-codes
what the Qwen families make flags); they are normalised here so the model code has one switch set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.errors import UnsupportedModelError

MOE_ARCHITECTURES = frozenset({"MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"})


@dataclass(frozen=True)
class MoEConfig:
    """``num_experts`` routed experts, ``top_k`` per token, each a SiLU-gated MLP of ``intermediate_size``."""

    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool = True  # renormalise the top-k softmax probabilities to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: one always-on expert behind a sigmoid gate
    decoder_sparse_step: int = 1  # Qwen: every n-th layer is sparse ...
    mlp_only_layers: tuple[int, ...] = field(default=())  # ... except these, which stay dense

    def __post_init__(self) -> None:
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise UnsupportedModelError(
                f"MoE config: num_experts_per_tok {self.top_k} must be in [1, num_experts {self.num_experts}]"
            )
        if self.intermediate_size < 1 or self.decoder_sparse_step < 1:
            raise UnsupportedModelError("MoE config: expert intermediate size and decoder_sparse_step must be >= 1")

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` routes its tokens to experts (else it has a dense MLP)."""
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_expert_intermediate_size > 0


def moe_config_from_hf(arch: str, cfg: dict[str, Any]) -> MoEConfig | None:
    """The MoE settings of an HF ``config.json`` dict; None for a dense architecture."""
    if arch not in MOE_ARCHITECTURES:
        return None
    # transformers >= 5 writes num_local_experts for every family; the Hub's Qwen configs say num_experts
    num_experts = _required(cfg, arch, "num_local_experts", "num_experts")
    top_k = _required(cfg, arch, "num_experts_per_tok")
    if arch == "MixtralForCausalLM":  # always renormalises; its experts use intermediate_size
        return MoEConfig(num_experts, top_k, _required(cfg, arch, "intermediate_size"))
    return MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        intermediate_size=_required(cfg, arch, "moe_intermediate_size"),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0)
        if arch == "Qwen2MoeForCausalLM"
        else 0,
        decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
        mlp_only_layers=tuple(int(i) for i in cfg.get("mlp_only_layers") or ()),
    )


def _required(cfg: dict[str, Any], arch: str, *keys: str) -> int:
    for key in keys:
        if cfg.get(key) is not None:
            return int(cfg[key])
    raise UnsupportedModelError(f"{arch} config.json lacks {' / '.join(keys)}")
