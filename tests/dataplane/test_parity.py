"""Disaggregated tokens equal the offline `LLM`'s: greedy and seeded, chunked, prefix-cached.

Each prompt's KV is computed by the prefill process (64-token chunks), pushed layer by layer
into the decode process's blocks over the backend under test, and decoded there.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from engine.sampling_params import SamplingParams
from tests.dataplane.harness import PREFILL_CHUNK, Cluster, tokens_of

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "How many legs does a spider have?",
]
LONG_TEXT = (
    "The history of computing is a story of layered abstractions. Early machines were wired by hand; "
    "stored programs let software change what hardware does; compilers let people write for many "
    "machines at once; operating systems shared one machine among many programs; networks joined "
    "machines into systems that no one person could hold in mind. Each layer hid the one below it, "
    "and each was first dismissed as too slow, then taken for granted. Virtual machines, containers "
    "and serverless functions repeated the pattern, as did the accelerators that now train and serve "
    "large language models across thousands of chips. Summarize this in one sentence."
)
SYSTEM = (
    "You are a careful assistant working for a library. You answer questions about books, authors "
    "and opening hours briefly and politely, and you never invent facts you do not know for sure."
)


def chat(tokenizer, text: str, system: str | None = None) -> list[int]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def prompts(reference) -> list[list[int]]:
    tok = reference.tokenizer
    out = [chat(tok, q) for q in QUESTIONS] + [chat(tok, LONG_TEXT)]
    assert len(out[-1]) > 2 * PREFILL_CHUNK, "the long prompt must span several prefill chunks"
    return out


def run_all(cluster: Cluster, prompts: list[list[int]], params: list[SamplingParams], remote: bool = True):
    with ThreadPoolExecutor(len(prompts)) as ex:
        return list(ex.map(lambda a: cluster.generate(a[0], a[1], remote=remote), zip(prompts, params)))


def test_greedy_tokens_match_offline(cluster: Cluster, reference, prompts) -> None:
    params = [SamplingParams(temperature=0.0, max_tokens=8)] * len(prompts)
    expected = [o.token_ids for o in reference.generate(prompts, params)]
    got = run_all(cluster, prompts, params)
    assert [tokens_of(c) for c in got] == expected
    assert all(c[-1].finish_reason in ("stop", "length") for c in got)
    assert all(c[0].prefill_worker == cluster.prefill.worker_id for c in got)
    cluster.wait_pools_full()


def test_seeded_sampling_matches_offline(cluster: Cluster, reference, prompts) -> None:
    params = [SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=100 + i, max_tokens=8, logprobs=2)
              for i in range(len(prompts))]
    ref = reference.generate(prompts, params)
    got = run_all(cluster, prompts, params)
    for r, chunks in zip(ref, got):
        assert tokens_of(chunks) == r.token_ids
        lps = [lp.logprob for c in chunks for lp in c.logprobs or []]
        assert lps == pytest.approx(r.logprobs, abs=1e-4)  # the first one was sampled by prefill
    cluster.wait_pools_full()


def test_decode_only_path_matches_offline(cluster: Cluster, reference, prompts) -> None:
    params = [SamplingParams(temperature=0.0, max_tokens=6)] * 2 + [SamplingParams(seed=7, max_tokens=6)]
    picked = [prompts[0], prompts[-1], prompts[2]]
    expected = [o.token_ids for o in reference.generate(picked, params)]
    got = run_all(cluster, picked, params, remote=False)
    assert [tokens_of(c) for c in got] == expected
    assert all(c[0].prefill_worker == "" for c in got)
    # n > 1 runs locally only (a disaggregated request carries one sequence)
    two = SamplingParams(n=2, seed=11, temperature=0.9, max_tokens=5)
    ref = reference.generate([prompts[1]], two)[0]
    chunks = cluster.generate(prompts[1], two, remote=False)
    assert [[t for c in chunks if c.index == i for t in c.token_ids] for i in (0, 1)] == [
        o.token_ids for o in ref.outputs
    ]
    cluster.wait_pools_full()


def test_prefix_cached_on_prefill_side(cluster: Cluster, reference) -> None:
    tok = reference.tokenizer
    system = SYSTEM + f" ({cluster.backend} session)"  # not cached by an earlier test
    a, b = chat(tok, "Is the library open on Sunday?", system), chat(tok, "Who wrote Hamlet?", system)
    params = SamplingParams(temperature=0.0, max_tokens=6)
    expected = [o.token_ids for o in reference.generate([a, b], params)]
    before = cluster.prefill_client.status()
    first = cluster.generate(a, params)
    second = cluster.generate(b, params)
    after = cluster.prefill_client.status()
    assert [tokens_of(first), tokens_of(second)] == expected
    assert second[0].cached_tokens >= 3 * 16, "the shared system prompt should hit the prefill cache"
    assert after.prompt_tokens_cached - before.prompt_tokens_cached >= second[0].cached_tokens
    cluster.wait_pools_full()


def test_prefix_cached_on_decode_side(cluster: Cluster, reference) -> None:
    """Decode ran the first prompt itself; the second extends it, so decode's own cache holds the
    head and prefill pushes only the rest (skip_blocks > 0)."""
    tok = reference.tokenizer
    head = chat(tok, LONG_TEXT + f" Backend: {cluster.backend}.")
    longer = head + tok.encode(" Then give one example.", add_special_tokens=False)
    params = SamplingParams(temperature=0.0, max_tokens=6)
    expected = [o.token_ids for o in reference.generate([head, longer], params)]
    _, d0 = cluster.statuses()
    first = cluster.generate(head, params, remote=False)
    _, d1 = cluster.statuses()
    second = cluster.generate(longer, params)
    _, d2 = cluster.statuses()
    assert [tokens_of(first), tokens_of(second)] == expected
    assert d2.prompt_tokens_cached - d1.prompt_tokens_cached >= (len(head) // 16 - 1) * 16
    assert 0 < d1.prompt_tokens_computed - d0.prompt_tokens_computed <= len(head)
    cluster.wait_pools_full()
