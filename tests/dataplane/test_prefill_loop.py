"""`PrefillLoop` in-process, on the real SmolLM2 engine: what it publishes, and when."""

from __future__ import annotations

import threading
import time

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kvtransfer.registry import create_transport
from prefill_worker.loop import PrefillLoop
from prefill_worker.messages import PrefillJob


def test_new_jobs_lease_is_published_before_its_first_step(smollm2_path, monkeypatch) -> None:
    """The lease renewer reads the loop's snapshot; a job must be in it while its first step runs
    (a step can outlast a short lease: a long chunk on a slow CPU), not only after the step."""
    engine = LLMEngine(EngineConfig(model=str(smollm2_path)))
    transport = create_transport("tcp", "prefill-under-test")
    loop = PrefillLoop(engine, transport)
    in_step, release = threading.Event(), threading.Event()

    def blocked_step() -> bool:  # stands in for the model step, which is not the unit here
        in_step.set()
        release.wait(30)
        return False

    monkeypatch.setattr(loop, "_step", blocked_step)
    loop.known_peers["decode-a"] = b"metadata"  # as if handshaken
    loop.start()
    try:
        loop.submit(PrefillJob(
            request_id="r1", prompt_token_ids=list(range(1, 40)), params=SamplingParams(max_tokens=1),
            peer="decode-a", decode_address="127.0.0.1:1", dst_blocks=[0, 1, 2], skip_blocks=0, lease_s=2.0,
        ))  # fmt: skip
        assert in_step.wait(30)
        assert loop.snapshot().leased == {"127.0.0.1:1": (2.0, ["r1"])}
    finally:
        release.set()
        loop.stop()
        transport.close()


def _job(rid: str, n_tokens: int) -> PrefillJob:
    return PrefillJob(
        request_id=rid, prompt_token_ids=list(range(1, n_tokens + 1)), params=SamplingParams(max_tokens=1),
        peer="decode-a", decode_address="127.0.0.1:1", dst_blocks=[0, 1, 2], skip_blocks=0, lease_s=30.0,
    )  # fmt: skip


def test_own_admission_limits_count_jobs_not_yet_in_a_snapshot(smollm2_path, monkeypatch) -> None:
    """A burst of RemotePrefill calls all reads one stale snapshot; the limits must still hold."""
    engine = LLMEngine(EngineConfig(model=str(smollm2_path)))
    transport = create_transport("tcp", "prefill-under-test")
    loop = PrefillLoop(engine, transport)
    release = threading.Event()
    monkeypatch.setattr(loop, "_step", lambda: release.wait(30) and False)
    loop.known_peers["decode-a"] = b"metadata"
    try:  # not started: nothing is drained, the snapshot stays empty
        assert loop.try_submit(_job("big", 300), max_requests=2, max_tokens=100) == ""  # alone: taken
        assert "max_queued_prompt_tokens=100" in loop.try_submit(_job("r1", 10), max_requests=0, max_tokens=100)
        assert loop.try_submit(_job("r2", 10), max_requests=2, max_tokens=0) == ""
        assert "2 requests queued" in loop.try_submit(_job("r3", 10), max_requests=2, max_tokens=0)
        assert loop.try_submit(_job("r4", 10), max_requests=0, max_tokens=0) == ""  # 0: no limit
        loop.start()  # drained into the engine: the snapshot counts them, the pending count is back to 0
        for _ in range(300):
            if loop.snapshot().num_waiting + loop.snapshot().num_running == 3:
                break
            time.sleep(0.1)
        assert loop.snapshot().num_waiting + loop.snapshot().num_running == 3
        assert loop._pending == (0, 0)
        assert "3 requests queued" in loop.try_submit(_job("r5", 10), max_requests=3, max_tokens=0)
    finally:
        release.set()
        loop.stop()
        transport.close()
