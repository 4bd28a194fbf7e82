"""`DecodeServicer.Generate` on a real `DecodeLoop` and SmolLM2 engine, with the gRPC context
faked (it is below the unit): a client that is gone by the time the handler runs."""

from __future__ import annotations

import time

from decode_worker.loop import DecodeLoop, DecodeLoopConfig
from decode_worker.server import DecodeServicer
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from protocol.proto import worker_pb2 as pb
from protocol.wire import params_to_proto


class RpcEnded(Exception):
    """What ``context.abort`` raises, as gRPC's own does, to end the handler."""


class GoneContext:
    """A servicer context whose RPC had already terminated (cancelled before dispatch): gRPC
    registers no callback then (``add_callback`` returns False) and reports it inactive."""

    def __init__(self) -> None:
        self.aborted: tuple | None = None

    def add_callback(self, cb) -> bool:
        return False

    def is_active(self) -> bool:
        return False

    def abort(self, code, details):
        self.aborted = (code, details)
        raise RpcEnded(details)


def test_a_client_gone_before_the_handler_runs_frees_its_request(smollm2_path) -> None:
    engine = LLMEngine(EngineConfig(model=str(smollm2_path)))
    loop = DecodeLoop(engine, None, None, DecodeLoopConfig())
    servicer = DecodeServicer(loop, worker_id="decode-under-test")
    loop.start()
    try:
        req = pb.GenerateRequest(
            request_id="gone-early", prompt_token_ids=list(range(1, 60)),
            params=params_to_proto(SamplingParams(max_tokens=2000, ignore_eos=True)),
        )  # fmt: skip
        context = GoneContext()
        try:  # the handler returns, or ends the RPC with the loop's CANCELLED: either is fine
            assert list(servicer.Generate(req, context)) == []
        except RpcEnded:
            assert context.aborted is not None and context.aborted[0].name == "CANCELLED"
        deadline = time.monotonic() + 10  # without the abort it would run 2000 steps
        while time.monotonic() < deadline:
            snap = loop.snapshot()
            if snap.num_running == 0 and snap.num_waiting == 0 and snap.num_free_blocks == snap.num_total_blocks:
                break
            time.sleep(0.05)
        snap = loop.snapshot()
        assert (snap.num_running, snap.num_waiting) == (0, 0)
        assert snap.num_free_blocks == snap.num_total_blocks
    finally:
        loop.stop()
