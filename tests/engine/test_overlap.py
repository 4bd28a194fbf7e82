"""Overlap (`engine.async_step`): decode step N+1 launched before step N's tokens are read gives
the same tokens, logprobs and finish reasons as synchronous steps, and frees every block."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.async_step import InFlightStep
from tests.engine.tiny_llama import write_tiny_llama

PARAMS = [
    SamplingParams(max_tokens=24, temperature=0.8, seed=3, repetition_penalty=1.3, logprobs=2),
    SamplingParams(max_tokens=24, temperature=1.0, seed=4, top_k=20, top_p=0.9, min_p=0.05, min_tokens=10),
    SamplingParams(max_tokens=30, temperature=0, presence_penalty=0.5, frequency_penalty=0.7),
    SamplingParams(max_tokens=12, temperature=0.7, seed=5, stop_token_ids=[7, 40, 90], min_tokens=2),
    SamplingParams(max_tokens=20, temperature=0, logprobs=3),
    SamplingParams(max_tokens=28, temperature=1.2, seed=9, top_p=0.5, n=2),
    SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
]
PROMPTS = [[5 + i, 17, 33 + i, 9] * (1 + i % 3) for i in range(len(PARAMS))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), eos_token_id=[1, 2, 3]))


def _run(model: str, overlap: bool, **kw: object) -> tuple[list, int, int]:
    llm = LLM(model, random_weights=True, overlap_scheduling=overlap, max_num_seqs=8, max_model_len=256, **kw)
    engine = llm.engine
    launched = 0
    step = engine.step

    def counting_step():
        nonlocal launched
        outs = step()
        launched += isinstance(engine._inflight, InFlightStep)
        return outs

    engine.step = counting_step  # type: ignore[method-assign]
    outs = llm.generate(PROMPTS, PARAMS)
    while engine.has_schedulable_requests():  # a last step in flight: read it back
        engine.step()
    assert engine.blocks.num_free_blocks == engine.blocks.num_total_blocks
    engine.check_integrity()
    got = [[(c.token_ids, c.finish_reason, c.stop_reason, c.logprobs) for c in o.outputs] for o in outs]
    return got, launched, engine.scheduler.num_preemptions


def _same(a: list, b: list) -> None:
    """Same tokens and finish reasons; logprobs to float32 rounding (the batch a row runs in
    differs by the one extra step overlap gives a finished sequence, and CPU matmuls round
    per batch shape)."""
    assert [[c[:3] for c in o] for o in a] == [[c[:3] for c in o] for o in b]
    for oa, ob in zip(a, b):
        for ca, cb in zip(oa, ob):
            assert (ca[3] is None) == (cb[3] is None)
            if ca[3] is not None:
                assert ca[3] == pytest.approx(cb[3], abs=1e-5)


@pytest.mark.parametrize("graphs", [True, False])
def test_overlap_matches_synchronous_steps(tiny: str, graphs: bool) -> None:
    on, overlapped, _ = _run(tiny, True, cuda_graphs=graphs)
    off, none, _ = _run(tiny, False, cuda_graphs=graphs)
    _same(on, off)
    assert overlapped > 10 and none == 0


def test_abort_while_a_step_is_in_flight(tiny: str) -> None:
    llm = LLM(tiny, random_weights=True, max_num_seqs=8, max_model_len=256, overlap_scheduling=True)
    engine = llm.engine
    for i in range(3):
        engine.add_request(f"r{i}", PROMPTS[i], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    while engine._inflight is None:
        engine.step()
    engine.abort_request("r1")
    finished: dict[str, int] = {}
    while engine.has_unfinished_requests() or engine.has_schedulable_requests():
        for out in engine.step():
            assert out.request_id != "r1"
            if out.finished:
                finished[out.request_id] = len(out.outputs[0].token_ids)
    assert finished == {"r0": 50, "r2": 50}
    assert engine.blocks.num_free_blocks == engine.blocks.num_total_blocks


def test_overlap_under_preemption_and_chunked_prefill(tiny: str) -> None:
    """A pool too small for the batch (preemptions) and prompts split in chunks: the engine
    leaves overlap whenever the next step could preempt or prefill, and tokens stay the same."""
    kw = dict(num_kv_blocks=10, max_num_batched_tokens=16, cuda_graphs=True)
    on, overlapped, preempted = _run(tiny, True, **kw)
    off, _, _ = _run(tiny, False, **kw)
    _same(on, off)
    assert overlapped > 0 and preempted > 0
