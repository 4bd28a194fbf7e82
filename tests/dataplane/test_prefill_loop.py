"""`PrefillLoop` in-process, on the real SmolLM2 engine: what it publishes, and when."""

from __future__ import annotations

import threading

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
