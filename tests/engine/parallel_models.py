"""Tiny random-weight models saved as HF folders, for the worker-group parity tests.

Float32 with decisive routing, so greedy tokens do not flip on the summation order of a split.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from tests.engine.test_moe_hf_parity import hf_moe

LLAMA = dict(
    vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
)


def save_tiny_llama(path: Path, seed: int = 3, **overrides: int) -> Path:
    """A 4-layer Llama (``overrides`` change its config, e.g. ``num_key_value_heads=1``)."""
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **overrides})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.25)  # large enough that greedy tokens vary
    hf.save_pretrained(path)
    return path


def save_tiny_mixtral(path: Path, seed: int = 11) -> Path:
    """The MoE parity tests' tiny Mixtral (4 experts, top-2, 2 layers)."""
    hf, _ = hf_moe("mixtral", seed=seed)
    hf.save_pretrained(path)
    return path


def save_tiny_llama_with_tokenizer(path: Path, tokenizer_from: Path) -> Path:
    """A tiny Llama over SmolLM2's vocabulary, with its tokenizer files: servable by the router."""
    import shutil

    save_tiny_llama(path, vocab_size=49152, num_hidden_layers=2, bos_token_id=1, eos_token_id=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, path / name)
    return path


def offline_greedy_texts(model: Path, prompts: list[str], max_tokens: int) -> list[str]:
    """The offline engine's greedy texts for ``prompts``: the reference every served path must give."""
    from engine import LLM, SamplingParams

    with LLM(str(model)) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return [o.outputs[0].text for o in outs]
