"""Model definitions. One Llama-family implementation covers Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2;
its MoE variant (`engine.models.mixtral`) covers Mixtral, Qwen2-MoE and Qwen3-MoE."""

from engine.models.llama import LlamaForCausalLM
from engine.models.mixtral import MoEForCausalLM

__all__ = ["LlamaForCausalLM", "MoEForCausalLM"]
