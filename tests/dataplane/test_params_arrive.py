"""A request's sampling parameters and prompt reach both engine loops exactly as the router sent
them: router client (`GrpcBackend`) -> decode worker (gRPC) -> prefill worker (gRPC).

Both workers run in this process, each with its real gRPC server, engine thread and TCP KV
transport, so their loops' inboxes can be watched: ``submit`` is wrapped to record what each
loop received. Every `SamplingParams` field takes a non-default value in some case, and the
optional ones are both set and unset. The stream is closed after its first delta: by then both
loops have the request, and closing cancels it on both workers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from decode_worker.loop import DecodeLoop
from decode_worker.messages import NewRequest
from decode_worker.server import start_decode_worker
from engine.sampling_params import SamplingParams
from prefill_worker.loop import PrefillLoop
from prefill_worker.messages import PrefillJob
from prefill_worker.server import start_prefill_worker
from protocol.decode_client import DecodeClient
from protocol.prefill_client import PrefillClient
from protocol.registry import WorkerInfo
from router.backend import GenerateRequest
from router.grpc_backend import GrpcBackend
from tests.dataplane.harness import BLOCK_SIZE, TOKEN, worker_spec

VOCAB = 49152  # SmolLM2's; the prompt uses both ends of it
PROMPT = [0, 1, VOCAB - 1, 17, 2**15, *range(300, 340)]


@dataclass
class Received:
    decode: list[NewRequest] = field(default_factory=list)
    prefill: list[PrefillJob] = field(default_factory=list)


@dataclass
class Workers:
    received: Received
    decode: WorkerInfo
    prefill: WorkerInfo

    def backend(self) -> GrpcBackend:
        ids = {w.worker_id: w for w in (self.decode, self.prefill)}
        return GrpcBackend(tokenizer=None, token=TOKEN, lookup=ids.get)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def workers(smollm2_path: Path) -> Iterator[Workers]:
    received = Received()
    decode_submit, prefill_submit = DecodeLoop.submit, PrefillLoop.submit

    def record_decode(self: DecodeLoop, req: NewRequest) -> Any:
        received.decode.append(req)
        return decode_submit(self, req)

    def record_prefill(self: PrefillLoop, job: PrefillJob) -> None:
        received.prefill.append(job)
        prefill_submit(self, job)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DecodeLoop, "submit", record_decode)
        mp.setattr(PrefillLoop, "submit", record_prefill)
        prefill = start_prefill_worker(worker_spec("prefill", smollm2_path, "tcp", worker_id="prefill-0"), TOKEN)
        try:
            decode = start_decode_worker(worker_spec("decode", smollm2_path, "tcp", worker_id="decode-0"), TOKEN)
            try:
                yield Workers(
                    received,
                    WorkerInfo(decode.worker_id, "decode", decode.address, 256, BLOCK_SIZE),
                    WorkerInfo(prefill.worker_id, "prefill", prefill.address, 256, BLOCK_SIZE),
                )
            finally:
                _wait_idle(decode.address, prefill.address)
                decode.stop()
        finally:
            prefill.stop()


def _wait_idle(decode_address: str, prefill_address: str, timeout: float = 30.0) -> None:
    """Cancelled requests must leave both pools whole (no leaked KV block)."""
    with DecodeClient(decode_address, TOKEN) as d, PrefillClient(prefill_address, TOKEN) as p:
        deadline = time.monotonic() + timeout
        while True:
            ds, ps = d.status(), p.status()
            if all(s.num_free_blocks == s.num_total_blocks and s.num_running == s.num_waiting == 0
                   for s in (ds, ps)) and ds.num_leases == 0:
                return
            assert time.monotonic() < deadline, f"pools not back to full:\ndecode {ds}\nprefill {ps}"
            time.sleep(0.1)


def _first_delta(workers: Workers, request: GenerateRequest) -> None:
    async def run() -> None:
        backend = workers.backend()
        stream = backend.generate(request)
        try:
            first = await anext(stream)
            assert first.token_ids or first.finish_reason
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
            await backend.close()

    asyncio.run(run())


EVERY_FIELD_SET = SamplingParams(
    n=1, temperature=0.7, top_p=0.9, top_k=5, min_p=0.05, seed=2**40 + 3, presence_penalty=0.5,
    frequency_penalty=-0.25, repetition_penalty=1.1, max_tokens=7, min_tokens=2, stop=("\n\n", "Done.", "é"),
    stop_token_ids=(2, 49151), ignore_eos=True, logprobs=3, skip_special_tokens=False,
    include_stop_str_in_output=True,
)
OPTIONALS_UNSET = SamplingParams(
    temperature=0.0, top_p=0.5, top_k=-1, seed=None, max_tokens=None, logprobs=None, stop=("x",),
    repetition_penalty=0.9,
)
REMOTE_CASES = {
    "every-field-set": EVERY_FIELD_SET,
    "optionals-unset": OPTIONALS_UNSET,
    "zero-not-unset": SamplingParams(seed=0, logprobs=0, max_tokens=1, min_tokens=1, temperature=1.5, min_p=1.0),
}


@pytest.mark.parametrize("params", REMOTE_CASES.values(), ids=REMOTE_CASES.keys())
def test_disaggregated_request_reaches_decode_and_prefill_unchanged(
    workers: Workers, params: SamplingParams
) -> None:
    rid = f"arrive-{len(workers.received.decode)}"
    _first_delta(workers, GenerateRequest(rid, list(PROMPT), params, "decode-0", "prefill-0"))
    at_decode = [r for r in workers.received.decode if r.request_id == rid]
    at_prefill = [j for j in workers.received.prefill if j.request_id.startswith(f"{rid}#")]
    assert len(at_decode) == 1 and len(at_prefill) == 1
    assert at_decode[0].params == params and at_prefill[0].params == params
    assert at_decode[0].prompt_token_ids == PROMPT and at_prefill[0].prompt_token_ids == PROMPT
    assert at_decode[0].prefill is not None and at_decode[0].prefill.worker_id == "prefill-0"


def test_local_request_with_n_reaches_decode_unchanged(workers: Workers) -> None:
    """n > 1 runs on decode alone (a disaggregated request is one sequence): nothing at prefill."""
    params = SamplingParams(n=3, seed=11, temperature=0.8, max_tokens=4, logprobs=1, stop=("a b",))
    before = len(workers.received.prefill)
    _first_delta(workers, GenerateRequest("arrive-local", list(PROMPT), params, "decode-0", None))
    (got,) = [r for r in workers.received.decode if r.request_id == "arrive-local"]
    assert got.params == params and got.prompt_token_ids == PROMPT and got.prefill is None
    assert len(workers.received.prefill) == before
