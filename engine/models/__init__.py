"""Model definitions. One Llama-family implementation covers Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2."""

from engine.models.llama import LlamaForCausalLM

__all__ = ["LlamaForCausalLM"]
