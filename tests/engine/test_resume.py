"""A request resumed on another engine (migration by token replay) continues exactly where the
first left off: same tokens (greedy and seeded with penalties), same text, no text sent twice,
and a stop string that spans the cut is still found."""

from __future__ import annotations

import dataclasses

import pytest

from engine import LLM, SamplingParams
from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine

PROMPT = "Once upon a time, in a small village by the sea,"


@pytest.fixture(scope="module")
def llm(smollm2_path) -> LLM:
    return LLM(smollm2_path, max_model_len=512, max_num_batched_tokens=256)


def _stream(engine: LLMEngine, rid: str, ids: list[int], params: SamplingParams) -> tuple[list[int], str]:
    """Run one request alone, collecting what a worker would stream: delta ids and delta text."""
    engine.add_request(rid, ids, params)
    tokens: list[int] = []
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            c = out.outputs[0]
            tokens += c.delta_token_ids
            text += c.delta_text
    return tokens, text


CASES = {
    "greedy": SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
    "seeded-penalties": SamplingParams(
        temperature=0.9, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True,
        presence_penalty=0.5, frequency_penalty=0.4, repetition_penalty=1.2, min_tokens=6,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_resumed_request_continues_identically(llm: LLM, case: str) -> None:
    cut = 3
    engine = llm.engine
    ids = engine.tokenize(PROMPT)[1]
    params = CASES[case]
    full_tokens, full_text = _stream(engine, f"full-{case}", ids, params)
    # the first worker streamed `cut` tokens, then died; the text it had sent is what a
    # fresh run sends up to that point
    _, sent_text = _stream(engine, f"first-{case}", ids, dataclasses.replace(params, max_tokens=cut, min_tokens=0))
    resumed = dataclasses.replace(params, resumed_output_tokens=cut)
    rest_tokens, rest_text = _stream(engine, f"resumed-{case}", ids + full_tokens[:cut], resumed)
    assert full_tokens[:cut] + rest_tokens == full_tokens
    assert len(rest_tokens) == params.max_tokens - cut  # max_tokens counts the resumed ones
    assert full_text.startswith(sent_text)
    assert rest_text  # the continuation streams text, and none of what was already sent
    assert full_text.endswith(rest_text)
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


def test_stop_string_across_the_cut_is_found(llm: LLM) -> None:
    engine = llm.engine
    ids = engine.tokenize(PROMPT)[1]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens, text = _stream(engine, "probe", ids, greedy)
    # a stop string made of the end of token 3's text and the start of token 4's
    t3 = engine.tokenizer.decode(tokens[:4])
    stop = t3[-2:] + engine.tokenizer.decode(tokens[:5])[len(t3):][:2]
    assert len(stop) >= 3 and stop in text
    params = dataclasses.replace(greedy, stop=(stop,))
    ref_tokens, ref_text = _stream(engine, "ref", ids, params)
    resumed = dataclasses.replace(params, resumed_output_tokens=4)
    rest_tokens, rest_text = _stream(engine, "resumed-stop", ids + tokens[:4], resumed)
    assert tokens[:4] + rest_tokens == ref_tokens
    # what the first worker had sent (all but the hold-back) plus the continuation = the reference
    hold = len(stop) - 1
    sent_before = engine.tokenizer.decode(tokens[:4])
    sent_before = sent_before[: max(0, len(sent_before) - hold)]
    assert sent_before + rest_text == ref_text


def test_bad_resume_counts_are_named(llm: LLM) -> None:
    engine = llm.engine
    with pytest.raises(InvalidRequestError, match="resumed_output_tokens"):
        SamplingParams(resumed_output_tokens=-1)
    with pytest.raises(InvalidRequestError, match="resumed_output_tokens"):
        engine.add_request("bad-1", [1, 2, 3], SamplingParams(resumed_output_tokens=3))
    with pytest.raises(InvalidRequestError, match="resumed_output_tokens"):
        engine.add_request("bad-2", [1, 2, 3, 4, 5], SamplingParams(max_tokens=2, resumed_output_tokens=2))
    assert not engine.has_unfinished_requests()
