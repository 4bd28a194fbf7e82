"""`LLMEngine.step` with a `KVConnector` on the real SmolLM2 engine; the connector is a recording
fake (the engine is the unit here; the worker connectors are tested through real workers)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from engine.config import CacheConfig, EngineConfig
from engine.errors import InvalidRequestError
from engine.kv_connector import KVArrival, KVConnector, KVFailure, KVPoll, KVStepOutcome
from engine.llm_engine import LLMEngine
from engine.model_runner import StepResult
from engine.outputs import RequestError
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSeq

PROMPT = list(range(1, 40))  # 3 blocks of 16


class Recorder(KVConnector):
    """Remote prefill for requests given kv_params; records what the engine told it."""

    def __init__(self, push: bool = False) -> None:
        self.push = push
        self.allocated: dict[str, list[int]] = {}
        self.next_poll = KVPoll()
        self.layers: list[int] = []
        self.finished: list[str] = []
        self.hold: set[str] = set()
        self.done_after_step: set[str] = set()

    def num_remote_prompt_tokens(self, request_id: str, prompt_token_ids: Sequence[int], kv_params: object) -> int:
        return len(prompt_token_ids) if kv_params is not None else 0

    def on_blocks_allocated(self, request_id: str, kv_params: object, block_ids: list[int], n: int) -> None:
        self.allocated[request_id] = block_ids

    def request_finished(self, request_id: str) -> bool:
        self.finished.append(request_id)
        return request_id in self.hold

    def poll(self) -> KVPoll:
        poll, self.next_poll = self.next_poll, KVPoll()
        return poll

    def start_step(self, scheduled: Sequence[ScheduledSeq], block_tables: Sequence[Sequence[int]]) -> bool:
        return self.push

    def save_layer(self, layer: int) -> None:
        self.layers.append(layer)

    def end_step(self, scheduled: Sequence[ScheduledSeq], result: StepResult) -> KVStepOutcome:
        return KVStepOutcome(done={s.seq.request_id for s in scheduled} & self.done_after_step)


@pytest.fixture(scope="module")
def cfg(smollm2_path) -> EngineConfig:
    return EngineConfig(model=str(smollm2_path), cache=CacheConfig(num_blocks=16))


def test_remote_prompt_joins_with_the_peers_first_token(cfg: EngineConfig) -> None:
    conn = Recorder()
    engine = LLMEngine(cfg, kv_connector=conn)
    engine.add_request("r", PROMPT, SamplingParams(max_tokens=3, ignore_eos=True), kv_params="peer")
    assert not engine.has_schedulable_requests() and engine.stats().num_waiting == 1
    assert engine.step() == []  # blocks allocated, the peer asked; nothing runs
    assert len(conn.allocated["r"]) == 3 and engine.stats().num_remote_prefilling == 1
    conn.next_poll = KVPoll(arrived=[KVArrival("r", 42, num_cached_tokens=16)])
    outs = engine.step()  # arrival + the first decode step, in one step
    assert [o.outputs[0].token_ids[:1] for o in outs] == [[42], [42]]
    assert outs[0].num_cached_tokens == 16
    while engine.has_unfinished_requests():
        outs = engine.step()
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
    assert conn.finished == ["r"]
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


def test_poll_kv_hands_out_a_first_token_before_the_batch_runs(cfg: EngineConfig) -> None:
    conn = Recorder()
    engine = LLMEngine(cfg, kv_connector=conn)
    engine.add_request("local", PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()  # the local request is running: every later step is a decode step
    engine.add_request("r", PROMPT, SamplingParams(max_tokens=3, ignore_eos=True), kv_params="peer")
    engine.step()
    conn.next_poll = KVPoll(arrived=[KVArrival("r", 42)])
    (first,) = engine.poll_kv()  # no model run: only the arrival
    assert first.request_id == "r" and first.outputs[0].token_ids == [42]
    local_before = len(engine.outputs.requests["local"].seqs[0].output_token_ids)
    outs = engine.step()  # now the batch, with "r" in it, runs
    assert {o.request_id for o in outs} == {"local", "r"}
    assert len(engine.outputs.requests["local"].seqs[0].output_token_ids) == local_before + 1


def test_abort_while_prefilling_holds_blocks_until_released(cfg: EngineConfig) -> None:
    conn = Recorder()
    engine = LLMEngine(cfg, kv_connector=conn)
    engine.add_request("r", PROMPT, SamplingParams(max_tokens=3), kv_params="peer")
    engine.step()
    conn.hold.add("r")
    engine.abort_request("r")
    stats = engine.stats()
    assert stats.num_held == 1 and stats.num_free_blocks == stats.num_total_blocks - 3
    with pytest.raises(InvalidRequestError, match="already running"):  # its blocks are still taken
        engine.add_request("r", PROMPT, SamplingParams(max_tokens=3))
    conn.next_poll = KVPoll(arrived=[KVArrival("r", 7)])  # a late arrival of the aborted one
    assert engine.step() == []
    conn.next_poll = KVPoll(released=["r"])
    engine.step()
    stats = engine.stats()
    assert stats.idle and stats.num_free_blocks == stats.num_total_blocks
    engine.check_integrity()


def test_failure_ends_the_request_with_its_error(cfg: EngineConfig) -> None:
    conn = Recorder()
    engine = LLMEngine(cfg, kv_connector=conn)
    engine.add_request("r", PROMPT, SamplingParams(max_tokens=3), kv_params="peer")
    engine.step()
    conn.next_poll = KVPoll(failed=[KVFailure("r", RequestError("UNAVAILABLE", "prefill failed: boom"))])
    (out,) = engine.step()
    assert out.finished and out.finish_reason == "abort"
    assert out.error == RequestError("UNAVAILABLE", "prefill failed: boom")
    assert not engine.has_unfinished_requests() and engine.stats().idle


def test_worker_side_saves_each_layer_and_finishes_delivered_prompts(cfg: EngineConfig) -> None:
    conn = Recorder(push=True)
    engine = LLMEngine(cfg, kv_connector=conn)
    conn.done_after_step.add("p")
    engine.add_request("p", PROMPT, SamplingParams(max_tokens=50))
    (out,) = engine.step()
    assert conn.layers == list(range(engine.layout.num_layers))
    assert out.finished and out.finish_reason == "prefilled" and len(out.outputs[0].token_ids) == 1
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks
    assert engine.stats().prefix_hit_tokens == 0 and engine.kv_blocks_for(len(PROMPT)) == 3
