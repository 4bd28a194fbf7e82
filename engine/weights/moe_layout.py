"""The Hugging Face tensor names and shapes of an MoE layer's sparse block, as the Hub stores them.

Mixtral calls the block ``block_sparse_moe`` and an expert's projections ``w1`` (gate), ``w3`` (up)
and ``w2`` (down); the Qwen MoE families call it ``mlp`` with Llama's projection names, and
Qwen2-MoE adds a shared expert and its one-output gate.
"""

from __future__ import annotations

from engine.config import ModelConfig


def moe_block_shapes(cfg: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """HF name -> shape for the sparse block of the layer named ``prefix`` (``model.layers.i``)."""
    moe = cfg.moe
    assert moe is not None
    h, inter = cfg.hidden_size, moe.intermediate_size
    mixtral = cfg.architecture == "MixtralForCausalLM"
    block = f"{prefix}.block_sparse_moe" if mixtral else f"{prefix}.mlp"
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    shapes: dict[str, tuple[int, ...]] = {f"{block}.gate.weight": (moe.num_experts, h)}
    for e in range(moe.num_experts):
        shapes |= {
            f"{block}.experts.{e}.{gate}.weight": (inter, h),
            f"{block}.experts.{e}.{up}.weight": (inter, h),
            f"{block}.experts.{e}.{down}.weight": (h, inter),
        }
    if moe.has_shared_expert:
        s = moe.shared_expert_intermediate_size
        shapes |= {
            f"{block}.shared_expert.gate_proj.weight": (s, h),
            f"{block}.shared_expert.up_proj.weight": (s, h),
            f"{block}.shared_expert.down_proj.weight": (h, s),
            f"{block}.shared_expert_gate.weight": (1, h),
        }
    return shapes
