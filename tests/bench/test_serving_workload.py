"""Synthetic prompts of `splitserve bench`, measured with the embedded model's real tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bench.serving.workload import LengthDist, PromptBuilder, WorkloadError, build_prompts, parse_length
from engine.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2_path: Path) -> Tokenizer:
    return load_tokenizer(smollm2_path)


def _server_tokens(tok: Tokenizer, endpoint: str, text: str) -> list[int]:
    """What the router tokenizes (router/app.py): the chat template without, a prompt with, special tokens."""
    if endpoint == "chat":
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False)
    return tok.encode(text)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_prompts_have_the_requested_token_lengths(tokenizer: Tokenizer, endpoint: str) -> None:
    builder = PromptBuilder(tokenizer, endpoint, seed=0)
    prompts = build_prompts(builder, 12, LengthDist("uniform", 40, 600), LengthDist("fixed", 32))
    for p in prompts:
        got = len(_server_tokens(tokenizer, endpoint, p.text))
        assert 40 <= got <= 600 and p.input_len == got
        assert p.output_len == 32 and p.group is None
    assert len({p.input_len for p in prompts}) > 6, "lengths are drawn, not fixed"
    assert len({p.text for p in prompts}) == 12


def test_lengths_are_exact_for_fixed_sizes(tokenizer: Tokenizer) -> None:
    builder = PromptBuilder(tokenizer, "completions", seed=5)
    for n in (1, 16, 128, 1000):
        assert len(tokenizer.encode(builder.text(n))) == n
    chat = PromptBuilder(tokenizer, "chat", seed=5)
    for n in (31, 64, 500):
        assert len(_server_tokens(tokenizer, "chat", chat.text(n))) == n


def test_seed_makes_prompts_reproducible(tokenizer: Tokenizer) -> None:
    def texts(seed: int) -> list[str]:
        b = PromptBuilder(tokenizer, "completions", seed=seed)
        return [p.text for p in build_prompts(b, 3, LengthDist("fixed", 20), LengthDist("fixed", 4))]

    assert texts(1) == texts(1) != texts(2)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_shared_prefix_is_shared_token_for_token_within_a_group(tokenizer: Tokenizer, endpoint: str) -> None:
    builder = PromptBuilder(tokenizer, endpoint, seed=3)
    prefix, overhead = 48, builder.overhead()
    prompts = build_prompts(builder, 9, LengthDist("fixed", 128), LengthDist("fixed", 8),
                            shared_prefix=prefix, num_groups=3)
    assert [p.group for p in prompts] == [0, 1, 2] * 3
    ids = [_server_tokens(tokenizer, endpoint, p.text) for p in prompts]
    assert all(len(i) == 128 == p.input_len for i, p in zip(ids, prompts))
    shared = overhead + prefix if endpoint == "completions" else prefix  # chat: the template head is shared too
    heads = [tuple(i[:shared]) for i in ids]
    for g in range(3):
        group = {heads[k] for k in range(g, 9, 3)}
        assert len(group) == 1, "members of a group must share the prefix tokens"
        tails = {tuple(ids[k][shared + 20:]) for k in range(g, 9, 3)}
        assert len(tails) == 3, "the rest of each prompt is its own"
    assert len(set(heads)) == 3, "groups have different prefixes"


def test_impossible_workloads_are_refused(tokenizer: Tokenizer) -> None:
    builder = PromptBuilder(tokenizer, "chat", seed=0)
    with pytest.raises(WorkloadError, match="chat template"):
        build_prompts(builder, 2, LengthDist("fixed", 10), LengthDist("fixed", 4))
    with pytest.raises(WorkloadError, match="--shared-prefix 100"):
        build_prompts(PromptBuilder(tokenizer, "completions"), 2, LengthDist("fixed", 100), LengthDist("fixed", 4),
                      shared_prefix=100)


def test_length_flags_parse_into_distributions() -> None:
    assert parse_length(None, None, None, 128, "input") == LengthDist("fixed", 128)
    assert parse_length(64, None, None, 128, "input") == LengthDist("fixed", 64)
    assert parse_length(None, "100:200", None, 128, "input") == LengthDist("uniform", 100, 200)
    normal = parse_length(200, None, 50.0, 128, "output")
    assert normal == LengthDist("normal", 200, 50.0)
    draws = normal.sample(random.Random(0), 4000)
    assert min(draws) >= 1 and abs(sum(draws) / len(draws) - 200) < 5
    for bad in ("5:2", "a:b", "100", "0:5"):
        with pytest.raises(WorkloadError, match="--input-len-range"):
            parse_length(None, bad, None, 128, "input")
    with pytest.raises(WorkloadError, match="excludes"):
        parse_length(10, "1:2", None, 128, "input")
    with pytest.raises(WorkloadError, match="--output-len must"):
        parse_length(0, None, None, 128, "output")
