"""The embedded default cluster end to end: the official openai client against real processes.

One cluster for the module (1 prefill + 1 decode worker, a private redis-server, the router):
answers are sensible and equal the offline `LLM` token for token (greedy), short prompts run on
decode and long ones are disaggregated, 64 concurrent streams complete, bad input gets OpenAI
4xx bodies, fuzzing the served schema finds no 5xx, a client disconnect frees the request's
blocks, and after all of it every pool is back to full.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from engine.sampling_params import SamplingParams
from splitserve.serve import LocalCluster
from tests.e2e.harness import (
    MODEL,
    async_client,
    client,
    make_config,
    running_cluster,
    status,
    wait_for,
    wait_pools_full,
)

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
CHATS = [QUESTION, "Name three primary colors.", "How many legs does a spider have?"]
# long enough to be disaggregated (over router.disagg_threshold uncached tokens)
LONG = " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(40))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running_cluster(make_config(None), tmp_path_factory.mktemp("logs")) as c:
        yield c


@pytest.fixture(scope="module")
def api(cluster: LocalCluster) -> openai.OpenAI:
    return client(cluster)


@pytest.fixture(scope="module")
def reference(smollm2_path: Path, cluster: LocalCluster) -> Any:
    """The offline engine on the same model and block size: what the cluster must reproduce."""
    from engine.llm import LLM

    return LLM(smollm2_path, block_size=cluster.config.block_size, max_model_len=cluster.config.max_model_len)


def _computed(cluster: LocalCluster, role: str) -> int:
    return sum(status(cluster, w).prompt_tokens_computed for w in cluster.pool(role))


# ------------------------------------------------------------------------------- answers
def test_chat_answers_sensibly_with_usage(cluster: LocalCluster, api: openai.OpenAI) -> None:
    r = api.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0
    )
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    tok = cluster.app.state.router.backend.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}])
    prompt = tok.encode(text, add_special_tokens=False)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 0 < r.usage.completion_tokens <= 24


def test_chat_stream_equals_non_stream(api: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": CHATS[1]}]
    whole = api.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0)
    stream = api.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_greedy_chat_equals_offline_llm(api: openai.OpenAI, reference: Any) -> None:
    params = SamplingParams(max_tokens=20, temperature=0.0)
    outs = reference.generate([[{"role": "user", "content": c}] for c in CHATS], params)
    for chat, out in zip(CHATS, outs):
        r = api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": chat}], max_tokens=20, temperature=0
        )
        assert r.choices[0].message.content == out.text, chat
        assert r.usage.completion_tokens == len(out.token_ids)
        assert r.usage.prompt_tokens == len(out.prompt_token_ids)


def test_greedy_disaggregated_completion_equals_offline_llm(
    cluster: LocalCluster, api: openai.OpenAI, reference: Any
) -> None:
    """A long prompt is computed by the prefill worker and its KV moved to decode; the tokens
    are still those of the one-process engine."""
    prompt = f"{LONG}\nQuestion: is 7 even or odd?\nAnswer:"
    ids = reference.tokenizer.encode(prompt)
    assert len(ids) > cluster.config.router.disagg_threshold
    before = _computed(cluster, "prefill")
    out = reference.generate([ids], SamplingParams(max_tokens=12, temperature=0.0))[0]
    r = api.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == out.text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(out.token_ids)
    assert _computed(cluster, "prefill") - before >= len(ids) - cluster.config.block_size  # prefill ran it
    stream = api.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == out.text  # now served from a prefix cache


def test_completions_text_prompt_and_stop(api: openai.OpenAI) -> None:
    r = api.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in r.choices[0].text
    stopped = api.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stop=["Paris"]
    )
    assert "Paris" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_sampling_n_seed_and_logprobs(api: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a word."}],
                              max_tokens=6, temperature=1.0, seed=7, n=2, logprobs=True, top_logprobs=2)
    a, b = api.chat.completions.create(**kw), api.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    lp = a.choices[0].logprobs.content
    assert lp and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp)
    assert a.usage.completion_tokens == sum(len(c.logprobs.content) for c in a.choices)


def test_64_concurrent_streams_complete(api: openai.OpenAI, cluster: LocalCluster) -> None:
    async def one(aclient: openai.AsyncOpenAI, i: int) -> tuple[str, str | None, int]:
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Say the number {i}."}], max_tokens=8,
            temperature=0, stream=True, stream_options={"include_usage": True},
        )
        text, finish, used = "", None, 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
        return text, finish, used

    async def main() -> list[tuple[str, str | None, int]]:
        aclient = async_client(cluster, timeout=240)
        try:
            return await asyncio.gather(*(one(aclient, i) for i in range(64)))
        finally:
            await aclient.close()

    results = asyncio.run(main())
    assert len(results) == 64
    for text, finish, used in results:
        assert finish in ("stop", "length") and text and 0 < used <= 8


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("path", "body", "status_code", "param"),
    [
        ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                  "temperature": -1}, 400, "temperature"),
        ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]},
         404, "model"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": [10**8]}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_k": 2**40}, 400, "top_k"),
    ],
)
def test_bad_input_is_4xx_with_openai_body(
    cluster: LocalCluster, path: str, body: Any, status_code: int, param: str | None
) -> None:
    r = httpx.post(f"{cluster.url}{path}", json=body, timeout=30)
    assert r.status_code == status_code, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] and err["param"].startswith(param)


def test_invalid_json_is_400(cluster: LocalCluster) -> None:
    r = httpx.post(f"{cluster.url}/v1/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def _bounded(case: Any) -> Any:
    """Keep generated requests cheap on a real CPU model: our model, a few tokens, few choices."""
    body = case.body
    if isinstance(body, dict):
        if isinstance(body.get("model"), str):
            body["model"] = MODEL
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and body[key] > 4:
                body[key] = 4
        # absent or null means "up to max_model_len": thousands of CPU decode steps, not a bug
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = 4
        if isinstance(body.get("n"), int) and body["n"] > 2:
            body["n"] = 2
    return case


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_fuzz_served_schema_no_5xx(cluster: LocalCluster, mode: GenerationMode) -> None:
    """Schemathesis cases from the served schema against real workers: no 5xx, OpenAI bodies."""
    schema = schemathesis.openapi.from_url(f"{cluster.url}/openapi.json")
    for op in (r.ok() for r in schema.get_all_operations()):
        if op.method.upper() != "POST":
            continue

        # no shrinking: each example runs the real model, and the failing body is printed whole
        @given(case=op.as_strategy(mode).map(_bounded))
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  phases=[Phase.explicit, Phase.generate])
        def check(case: Any) -> None:
            response = case.call(timeout=60)
            assert response.status_code < 500, f"{case.path} {json.dumps(case.body)}: {response.text[:500]}"
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        check()


# ------------------------------------------------------------------------------- cancellation
def test_client_disconnect_cancels_on_the_workers(cluster: LocalCluster) -> None:
    decode = cluster.pool("decode")[0]
    body = {"model": MODEL, "prompt": "Count from one to one thousand:", "max_tokens": 1500,
            "ignore_eos": True, "stream": True}
    url = f"{cluster.url}/v1/completions"
    with httpx.Client(timeout=60) as http, http.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        for n, _line in enumerate(r.iter_lines()):
            if n >= 6:
                break
        assert status(cluster, decode).num_running == 1
    # 1500 tokens would take far longer than this: the disconnect aborted it on the worker
    assert wait_for(lambda: status(cluster, decode).num_running == 0, timeout=5.0)


def test_disconnect_during_remote_prefill_frees_both_sides(cluster: LocalCluster) -> None:
    """The client gives up while the prefill worker is still computing a long prompt: the
    request is dropped on both workers and no block stays held."""
    prompt = f"{LONG} {LONG}\nQuestion: which numbers are prime?\nAnswer:"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 200, "ignore_eos": True, "stream": True}
    before = _computed(cluster, "prefill")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    wait_pools_full(cluster, timeout=20)
    assert _computed(cluster, "prefill") > before  # it had reached the prefill worker


# ------------------------------------------------------------------------------- afterwards
def test_pools_back_to_full_after_load(cluster: LocalCluster) -> None:
    statuses = wait_pools_full(cluster)
    assert set(statuses) == {"prefill-0", "decode-0"}
    assert all(s.num_total_blocks > 0 for s in statuses.values())
