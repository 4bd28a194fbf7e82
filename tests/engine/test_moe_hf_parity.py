"""MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE) vs HF transformers on the same random weights (float32).

Each tiny model is saved with ``save_pretrained`` (the Hub's per-expert safetensors layout) and
loaded through our checkpoint reader; the in-memory state dict (transformers' stacked experts)
is checked too. Routing weights are scaled up so top-k choices are far from ties.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from engine.config import ModelConfig
from engine.errors import WeightLoadError
from engine.layers.moe import ExpertParallel, ExpertParallelError
from engine.llm import LLM
from engine.model_loader import build_model, load_model
from engine.models.mixtral import MoEForCausalLM, SparseMoeBlock
from engine.sampling_params import SamplingParams
from tests.engine.test_hf_parity import BLOCK, Harness, _close, _hf_logits, _seq

BASE = dict(
    vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
)
FAMILIES = {
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    # layer 0 dense (mlp_only_layers), layer 1 sparse with the shared expert; raw top-k weights
    "qwen2_moe": (transformers.Qwen2MoeConfig, dict(
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=40, shared_expert_intermediate_size=72,
        norm_topk_prob=False, mlp_only_layers=[0], use_sliding_window=False,
    )),
    # q/k norm, renormalised top-3 of 8, every second layer sparse
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(
        num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=True,
        decoder_sparse_step=2, head_dim=24, use_sliding_window=False,
    )),
}


def hf_moe(family: str, seed: int = 0, **override: object) -> tuple[transformers.PreTrainedModel, dict]:
    """A random tiny HF model of ``family`` (config fields replaced by ``override``) and its config.json dict."""
    cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    hf_cfg = cls(**{**BASE, **extra, **override})
    hf_cfg._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif name.endswith("mlp.gate.weight") or "shared_expert_gate" in name:
                p.normal_(0.0, 0.5)  # decisive routing: no near-ties between experts
            elif "experts" in name:
                p.normal_(0.0, 0.1)
    cfg_dict = hf_cfg.to_dict()
    cfg_dict["architectures"] = [type(hf).__name__]
    return hf, cfg_dict


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def saved(request, tmp_path_factory) -> tuple[str, transformers.PreTrainedModel, Path]:
    hf, _ = hf_moe(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, path


def test_config_reads_each_family() -> None:
    _, mixtral = hf_moe("mixtral")
    moe = ModelConfig.from_hf_dict(mixtral).moe
    assert moe is not None and (moe.num_experts, moe.top_k, moe.intermediate_size) == (4, 2, 96)
    assert moe.norm_topk_prob and not moe.has_shared_expert
    _, qwen2 = hf_moe("qwen2_moe")
    cfg = ModelConfig.from_hf_dict(qwen2)
    assert cfg.attention_bias and cfg.moe is not None and cfg.moe.shared_expert_intermediate_size == 72
    assert [cfg.moe.is_sparse(i) for i in range(2)] == [False, True] and not cfg.moe.norm_topk_prob
    _, qwen3 = hf_moe("qwen3_moe")
    cfg = ModelConfig.from_hf_dict(qwen3)
    assert cfg.qk_norm and cfg.moe is not None and [cfg.moe.is_sparse(i) for i in range(2)] == [False, True]


def test_prefill_and_decode_match_hf(saved) -> None:
    _, hf, path = saved
    cfg, ours = load_model(path, torch.float32, "cpu")
    assert isinstance(ours, MoEForCausalLM)
    assert any(isinstance(layer.mlp, SparseMoeBlock) for layer in ours.layers)
    h = Harness(ours, cfg)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in (1, 17, 40)]
    seqs = [(_seq(p, f"s{i}"), len(p), h.blocks(-(-len(p) // BLOCK) + 1)) for i, p in enumerate(prompts)]
    for got, p in zip(h.run(seqs), prompts):
        _close(got, _hf_logits(hf, p))
    for _ in range(3):  # batched decode steps
        for s, _, _ in seqs:
            s.output_token_ids.append(int(torch.randint(0, cfg.vocab_size, (1,), generator=gen)))
        out = h.run([(s, 1, t) for s, _, t in seqs])
        for o, (s, _, _) in zip(out, seqs):
            _close(o[0], _hf_logits(hf, s.all_token_ids)[-1])


def test_in_memory_state_dict_loads() -> None:
    """transformers' in-memory layout (>= 5: all experts stacked in one tensor) loads as well as the Hub's."""
    hf, cfg_dict = hf_moe("mixtral", seed=3)
    cfg = ModelConfig.from_hf_dict(cfg_dict)
    ours = build_model(cfg, torch.float32, "cpu")
    ours.load_weights(hf.state_dict().items())
    ids = list(range(5, 30))
    h = Harness(ours, cfg)
    _close(h.run([(_seq(ids, "a"), len(ids), h.blocks(2))])[0], _hf_logits(hf, ids))


def test_offline_llm_greedy_matches_hf(saved) -> None:
    family, hf, path = saved
    prompt = [3, 14, 15, 92, 65, 35, 89, 79]
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(prompt):].tolist()
    llm = LLM(str(path), max_model_len=64, num_kv_blocks=16)
    got = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert got.outputs[0].token_ids == want, family


def test_missing_expert_is_a_named_error() -> None:
    hf, cfg_dict = hf_moe("qwen2_moe", seed=4)
    cfg = ModelConfig.from_hf_dict(cfg_dict)
    ours = build_model(cfg, torch.float32, "cpu")
    sd = {k: v for k, v in hf.state_dict().items() if not k.endswith("experts.down_proj")}
    with pytest.raises(WeightLoadError, match=r"missing \d+ expert weights"):
        ours.load_weights(sd.items())
    stray = {**hf.state_dict(), "model.layers.0.mlp.experts.0.gate_proj.weight": torch.zeros(40, 64)}
    with pytest.raises(WeightLoadError, match="layer 0 has no experts"):  # layer 0 is dense (mlp_only_layers)
        build_model(cfg, torch.float32, "cpu").load_weights(stray.items())


def test_ep_not_dividing_experts_names_the_field() -> None:
    _, cfg_dict = hf_moe("qwen2_moe")  # 6 experts
    cfg = ModelConfig.from_hf_dict(cfg_dict)
    with pytest.raises(ExpertParallelError, match=r"decode\.ep = 4 does not divide the model's 6 experts"):
        build_model(cfg, torch.float32, "cpu", ep=ExpertParallel(rank=0, size=4))


@pytest.mark.gpu
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gpu_kernel_matches_the_reference_in_the_model(family: str, tmp_path: Path) -> None:
    """bf16 on CUDA: the whole model's logits with the fused-MoE kernel vs with its torch twin."""
    from engine.kv_cache_pool import KVCachePool, KVLayout
    from engine.model_runner import ModelRunner
    from engine.scheduler import ScheduledSeq
    from gpu_kernels import ops
    from gpu_kernels.testing import rel_err

    # the Triton attention kernels take power-of-two head sizes (qwen3's CPU case uses 24)
    hf, _ = hf_moe(family, seed=5, **({"head_dim": 32} if family == "qwen3_moe" else {}))
    hf.save_pretrained(tmp_path)
    cfg, model = load_model(tmp_path, torch.bfloat16, "cuda")
    layout = KVLayout(cfg.num_layers, 16, cfg.num_kv_heads, BLOCK, cfg.head_dim, torch.bfloat16)
    runner = ModelRunner(model, KVCachePool(layout, "cuda"))
    prompts = [[3, 14, 15, 92, 65, 35, 89, 79], list(range(40, 77))]
    sched = [ScheduledSeq(_seq(p, f"s{i}"), len(p)) for i, p in enumerate(prompts)]
    tables = [[1, 2, 3], [4, 5, 6]]
    got = model.logits(runner.forward(sched, tables)[0])
    with ops.force_reference(["fused_moe"]):
        want = model.logits(runner.forward(sched, tables)[0])
    assert rel_err(got, want) <= 2e-2


def test_moe_gguf_is_refused_by_name(tmp_path: Path) -> None:
    """llama.cpp writes Mixtral as arch "llama" with an expert count; without this check it failed on a tensor name."""
    import gguf
    import numpy as np

    from engine.errors import UnsupportedModelError
    from engine.weights import resolve_model

    path = tmp_path / "mixtral.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_block_count, 1), (w.add_embedding_length, 8), (w.add_feed_forward_length, 16),
                   (w.add_head_count, 2), (w.add_vocab_size, 4), (w.add_expert_count, 8), (w.add_expert_used_count, 2)):
        add(v)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match=r"Mixture-of-Experts GGUF \(8 experts\)"):
        resolve_model(path)


def test_ep_other_than_tp_is_refused() -> None:
    """Experts split over ep ranks while tp splits heads over more ranks: no layout for that yet."""
    from engine.layers.moe import FusedMoE
    from engine.parallel import ParallelGroup

    with pytest.raises(ExpertParallelError, match=r"decode\.ep = 2 with tp = 4: .* need ep = tp"):
        FusedMoE(8, 64, 32, ExpertParallel(rank=0, size=2), ParallelGroup(tp_rank=0, tp_size=4))
