"""The offline `LLM` on the embedded SmolLM2 model, against HF transformers on the same GGUF."""

from __future__ import annotations

import pytest
import torch
import transformers

from engine import LLM, SamplingParams
from engine.errors import InvalidRequestError, ModelNotFoundError, PromptTooLongError
from engine.model_store import default_gguf_path

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "How many legs does a spider have?",
    "Explain in one sentence what a CPU does.",
    "Translate 'good morning' into Spanish.",
]


@pytest.fixture(scope="module")
def llm(smollm2_path) -> LLM:
    return LLM(smollm2_path, max_model_len=1024, max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def hf_model(smollm2_path):
    gguf = default_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32
    ).eval()


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _drain(llm: LLM) -> None:
    blocks = llm.engine.blocks
    blocks.check_integrity()
    assert blocks.num_free_blocks == blocks.num_total_blocks, "KV pool did not drain back to full"


def test_greedy_matches_hf_transformers_token_for_token(llm: LLM, hf_model) -> None:
    params = SamplingParams(max_tokens=32, temperature=0.0)
    outs = llm.generate([_chat(c) for c in CHATS[:5]], params)
    for out in outs:
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([out.prompt_token_ids]), max_new_tokens=32, do_sample=False,
                eos_token_id=list(llm.engine.eos_token_ids), pad_token_id=llm.engine.eos_token_ids[0],
            )[0, len(out.prompt_token_ids):].tolist()
        assert out.token_ids == ref
    _drain(llm)


def test_answers_sensibly(llm: LLM) -> None:
    out = llm.generate(_chat("What is the capital of France? Answer in one word."),
                       SamplingParams(max_tokens=16, temperature=0.0))[0]
    assert "paris" in out.text.lower()
    assert out.finish_reason in ("stop", "length")


def test_batch_equals_one_at_a_time(llm: LLM) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.0)
    prompts = [_chat(c) for c in CHATS] + ["The quick brown fox", [1, 2, 3, 4, 5]]
    together = [o.token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate(p, params)[0].token_ids for p in prompts]
    assert together == alone
    _drain(llm)


def test_seeded_sampling_reproducible_regardless_of_batch(llm: LLM) -> None:
    seeded = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=1234)
    target = _chat(CHATS[1])
    alone = llm.generate(target, seeded)[0].token_ids
    others = [_chat(c) for c in CHATS[2:]]
    noise = SamplingParams(max_tokens=20, temperature=1.0)
    batch = llm.generate([*others[:2], target, *others[2:]],
                         [noise, noise, seeded] + [noise] * (len(others) - 2))
    assert batch[2].token_ids == alone
    other_seed = llm.generate(target, SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=99))
    assert other_seed[0].token_ids != alone
    _drain(llm)


def test_prefix_cache_hit_gives_same_tokens(llm: LLM) -> None:
    system = {"role": "system", "content": "You are a terse assistant. " * 12}
    params = SamplingParams(max_tokens=16, temperature=0.0)
    first = llm.generate([system, *_chat(CHATS[0])], params)[0]
    second = llm.generate([system, *_chat(CHATS[0])], params)[0]
    assert second.num_cached_tokens >= 16 and second.num_cached_tokens > first.num_cached_tokens
    assert second.token_ids == first.token_ids
    _drain(llm)


def test_chunked_prefill_and_preemption_give_same_tokens(smollm2_path, llm: LLM) -> None:
    params = SamplingParams(max_tokens=40, temperature=0.0)
    prompts = [_chat(c * 3) for c in CHATS]
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    # 16 blocks of 16: every prompt (45..57 tokens + 40 new) fits alone, all six together do not
    tight = LLM(smollm2_path, max_model_len=1024, max_num_batched_tokens=32, num_kv_blocks=16,
                enable_prefix_caching=False)
    got = [o.token_ids for o in tight.generate(prompts, params)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == expected
    _drain(tight)


def test_stop_strings_logprobs_and_n(llm: LLM) -> None:
    base = llm.generate(_chat(CHATS[0]), SamplingParams(max_tokens=24, temperature=0.0))[0]
    word = base.text.split()[1]
    cut = llm.generate(_chat(CHATS[0]), SamplingParams(max_tokens=24, temperature=0.0, stop=[word]))[0]
    assert cut.finish_reason == "stop" and word not in cut.text and base.text.startswith(cut.text)
    lp = llm.generate(_chat(CHATS[0]), SamplingParams(max_tokens=4, temperature=0.0, logprobs=3))[0]
    assert len(lp.logprobs) == 4 and all(len(t) == 3 for t in lp.outputs[0].top_logprobs)
    for chosen, tok, top in zip(lp.logprobs, lp.token_ids, lp.outputs[0].top_logprobs):
        assert chosen <= 0.0 and top[tok] == pytest.approx(chosen)  # greedy: chosen is the top-1
    many = llm.generate("Once upon a time", SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=5))[0]
    assert len(many.outputs) == 3 and len({tuple(o.token_ids) for o in many.outputs}) > 1
    _drain(llm)


def test_bad_inputs_raise_named_errors(llm: LLM, tmp_path) -> None:
    with pytest.raises(InvalidRequestError, match="prompt"):
        llm.generate("", SamplingParams())
    with pytest.raises(PromptTooLongError):
        llm.generate([5] * 1024, SamplingParams())
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ModelNotFoundError):
        LLM(tmp_path / "no-such-model")
    _drain(llm)
