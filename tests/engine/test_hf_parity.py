"""Logits of our Llama-family model vs HF transformers on the same random weights (float32).

Covers every supported family, several prompt lengths, a prefix-cache hit (a second sequence
whose block table shares the first one's computed blocks), chunked prefill, and decode steps.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from engine.config import ModelConfig
from engine.kv_cache_pool import KVCachePool, KVLayout
from engine.model_loader import build_model
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSeq
from engine.sequence import Sequence

BASE = dict(
    vocab_size=160, hidden_size=96, intermediate_size=136, num_hidden_layers=2,
    num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
)
FAMILIES = {
    "llama3": (transformers.LlamaConfig, dict(
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    )),
    "llama2": (transformers.LlamaConfig, dict(num_key_value_heads=6)),
    "mistral": (transformers.MistralConfig, dict(num_attention_heads=8, num_key_value_heads=8, head_dim=12,
                                                 sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=3, use_sliding_window=False)),
    "qwen3": (transformers.Qwen3Config, dict(num_key_value_heads=2, head_dim=32, use_sliding_window=False)),
    "smollm2": (transformers.LlamaConfig, dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=144,
                                               tie_word_embeddings=True)),
}
BLOCK = 16
TOL = 1e-4


def _pair(family: str):
    cls, extra = FAMILIES[family]
    torch.manual_seed(hash(family) % 1000)
    hf_cfg = cls(**{**BASE, **extra})
    hf_cfg._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():  # HF inits norms to ones; perturb so a missed norm would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    cfg_dict = hf_cfg.to_dict()
    cfg_dict["architectures"] = [cls.__name__.replace("Config", "ForCausalLM")]
    cfg = ModelConfig.from_hf_dict(cfg_dict)
    ours = build_model(cfg, torch.float32, "cpu")
    ours.load_weights(hf.state_dict().items())
    return hf, ours, cfg


class Harness:
    """Drives our model through `ModelRunner` with hand-made block tables."""

    def __init__(self, model, cfg: ModelConfig, num_blocks: int = 64) -> None:
        layout = KVLayout(cfg.num_layers, num_blocks, cfg.num_kv_heads, BLOCK, cfg.head_dim, torch.float32)
        self.runner = ModelRunner(model, KVCachePool(layout))
        self.next_block = 1  # block 0 stays unused so a zero-padded table entry would show up

    def blocks(self, n: int) -> list[int]:
        out = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        return out

    def run(self, steps: list[tuple[Sequence, int, list[int]]]) -> list[torch.Tensor]:
        """One batched forward; returns each sequence's logits for its new tokens."""
        sched = [ScheduledSeq(seq, n) for seq, n, _ in steps]
        hidden, meta = self.runner.forward(sched, [t for _, _, t in steps])
        logits = self.runner.model.logits(hidden)
        out = []
        for i, (seq, n, _) in enumerate(steps):
            lo = int(meta.query_start_loc[i])
            out.append(logits[lo : lo + n])
            seq.num_computed_tokens += n
        return out


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    err = (a - b).abs().max().item()
    assert err <= TOL * max(1.0, b.abs().max().item()), f"max abs error {err}"


def _seq(ids: list[int], name: str) -> Sequence:
    return Sequence(name, name, list(ids), SamplingParams(max_tokens=8))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefill_batch_matches_hf(family: str) -> None:
    hf, ours, cfg = _pair(family)
    h = Harness(ours, cfg)
    gen = torch.Generator().manual_seed(1)
    lengths = [1, 15, 16, 17, 40]
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    steps = [(_seq(p, f"s{i}"), len(p), h.blocks((len(p) + BLOCK - 1) // BLOCK)) for i, p in enumerate(prompts)]
    for got, p in zip(h.run(steps), prompts):
        _close(got, _hf_logits(hf, p))


@pytest.mark.parametrize("family", ["llama3", "qwen3", "smollm2"])
def test_chunked_prefill_prefix_hit_and_decode_match_hf(family: str) -> None:
    hf, ours, cfg = _pair(family)
    h = Harness(ours, cfg)
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, cfg.vocab_size, (45,), generator=gen).tolist()
    ref = _hf_logits(hf, prompt)
    # chunked prefill: 7-token chunks
    a = _seq(prompt, "a")
    table_a = h.blocks(4)
    got = []
    while a.num_computed_tokens < len(prompt):
        n = min(7, len(prompt) - a.num_computed_tokens)
        got.append(h.run([(a, n, table_a)])[0])
    _close(torch.cat(got), ref)
    # prefix hit: b shares a's first two (full, computed) blocks and computes only its tail
    tail = torch.randint(0, cfg.vocab_size, (9,), generator=gen).tolist()
    b_ids = prompt[: 2 * BLOCK] + tail
    b = _seq(b_ids, "b")
    b.num_computed_tokens = 2 * BLOCK
    table_b = table_a[:2] + h.blocks(1)
    _close(h.run([(b, len(tail), table_b)])[0], _hf_logits(hf, b_ids)[2 * BLOCK :])
    # decode: both sequences advance one token at a time in one batch
    for _ in range(5):
        for s in (a, b):
            s.output_token_ids.append(int(torch.randint(0, cfg.vocab_size, (1,), generator=gen)))
        out = h.run([(a, 1, table_a), (b, 1, table_b)])
        _close(out[0][0], _hf_logits(hf, a.all_token_ids)[-1])
        _close(out[1][0], _hf_logits(hf, b.all_token_ids)[-1])
