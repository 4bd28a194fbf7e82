"""A step that raises fails only what it can be attributed to, on a real `DecodeLoop` and
SmolLM2 engine: one request's broken stop check ends that request alone (a clear INTERNAL
error, its blocks freed) while its batch-mate finishes with the reference tokens; a forward
pass that raises fails the requests of that step, and the loop keeps serving new ones."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from decode_worker.loop import DecodeLoop, DecodeLoopConfig
from decode_worker.messages import NewRequest, StreamError, TokenChunk
from engine.config import EngineConfig
from engine.errors import RequestStepError
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPT = list(range(300, 340))


@pytest.fixture(scope="module")
def loop(smollm2_path: Path) -> Iterator[DecodeLoop]:
    engine = LLMEngine(EngineConfig(model=str(smollm2_path)))
    loop = DecodeLoop(engine, None, None, DecodeLoopConfig())
    loop.start()
    yield loop
    loop.stop()


def _run(loop: DecodeLoop, rid: str, prompt: list[int] = PROMPT) -> queue.Queue:
    return loop.submit(NewRequest(rid, list(prompt), GREEDY, None, None))


def _drain(stream: queue.Queue, timeout: float = 120.0) -> tuple[list[int], StreamError | None]:
    """Tokens until the stream ends: (tokens, the error that ended it or None)."""
    tokens: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = stream.get(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(ev, StreamError):
            return tokens, ev
        assert isinstance(ev, TokenChunk)
        tokens += ev.token_ids
        if ev.finish_reason is not None:
            return tokens, None
    raise AssertionError("stream did not end")


def _pool_full(loop: DecodeLoop, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = loop.snapshot()
        if s.num_free_blocks == s.num_total_blocks and s.num_running == 0 and s.num_waiting == 0:
            return not s.integrity_error
        time.sleep(0.05)
    return False


def test_a_broken_stop_check_fails_only_its_request(loop: DecodeLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    reference, err = _drain(_run(loop, "ref-alone"))
    assert err is None and len(reference) == GREEDY.max_tokens
    outputs = loop.engine.outputs
    real = outputs.check_stop

    def broken(seq: Any, st: Any) -> Any:
        if seq.request_id == "bad" and len(seq.output_token_ids) >= 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a detokenizer bug")
        return real(seq, st)

    monkeypatch.setattr(outputs, "check_stop", broken)
    bad, good = _run(loop, "bad"), _run(loop, "good")
    bad_tokens, bad_err = _drain(bad)
    good_tokens, good_err = _drain(good)
    assert bad_err is not None and bad_err.code == "INTERNAL" and "stop check failed" in bad_err.message
    assert bad_tokens == reference[:1]  # what it streamed before the failure, nothing after
    assert good_err is None and good_tokens == reference  # its batch-mate is untouched
    assert _pool_full(loop)


def test_a_forward_that_raises_fails_that_step_and_the_loop_serves_on(
    loop: DecodeLoop, monkeypatch: pytest.MonkeyPatch,
) -> None:
    reference, _ = _drain(_run(loop, "ref-2"))
    runner = loop.engine.runner
    real = runner.run  # the step's forward, eager or replayed from a decode graph
    calls = {"n": 0}

    def flaky(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:  # mid-decode of both requests
            raise RuntimeError("CUDA error: an illegal memory access (injected)")
        return real(*args, **kw)

    monkeypatch.setattr(runner, "run", flaky)
    a, b = _run(loop, "a"), _run(loop, "b")
    (a_tokens, a_err), (b_tokens, b_err) = _drain(a), _drain(b)
    assert b_tokens == reference[: len(b_tokens)]
    assert a_err is not None and b_err is not None
    assert a_err.code == b_err.code == "INTERNAL" and "illegal memory access" in a_err.message
    assert a_tokens == reference[: len(a_tokens)] and len(a_tokens) < len(reference)
    assert _pool_full(loop)
    after, err = _drain(_run(loop, "after"))  # the worker is alive and correct
    assert err is None and after == reference
    assert _pool_full(loop)


def test_a_request_step_error_names_its_request(loop: DecodeLoop) -> None:
    assert loop.engine.failed_step_requests(RequestStepError("r-7", "boom")) == ["r-7"]
