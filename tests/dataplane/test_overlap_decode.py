"""A decode worker with overlap scheduling on (`decode.overlap_scheduling`) streams the offline
engine's tokens, remote and local prefill alike, and its pools drain back to full."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.local_workers import WorkerProcess
from engine.sampling_params import SamplingParams
from protocol.decode_client import DecodeClient
from protocol.prefill_client import PrefillClient
from tests.dataplane.harness import TOKEN, Cluster, tokens_of, worker_spec
from tests.dataplane.test_parity import chat, run_all

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three primary colors."]


@pytest.fixture(scope="module")
def overlap_cluster(smollm2_path: Path) -> Iterator[Cluster]:
    prefill = WorkerProcess(worker_spec("prefill", smollm2_path, "tcp"), TOKEN)
    decode = WorkerProcess(worker_spec("decode", smollm2_path, "tcp", overlap_scheduling=True), TOKEN)
    try:
        prefill.spawn()
        decode.spawn()
        prefill.wait_ready()
        decode.wait_ready()
        with DecodeClient(decode.address, TOKEN) as client, PrefillClient(prefill.address, TOKEN) as pclient:
            yield Cluster("tcp", prefill, decode, client, pclient)
    finally:
        codes = decode.stop(), prefill.stop()
    assert codes == (0, 0), f"unclean shutdown:\n{decode.log_tail()}\n{prefill.log_tail()}"


@pytest.mark.parametrize("remote", [True, False])
def test_overlapped_decode_worker_matches_offline(overlap_cluster: Cluster, reference, remote: bool) -> None:
    prompts = [chat(reference.tokenizer, q) for q in QUESTIONS]
    params = [SamplingParams(temperature=0.0, max_tokens=12),
              SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12, logprobs=1),
              SamplingParams(temperature=0.0, max_tokens=5, min_tokens=3)]  # fmt: skip
    expected = [o.token_ids for o in reference.generate(prompts, params)]
    got = run_all(overlap_cluster, prompts, params, remote=remote)
    assert [tokens_of(c) for c in got] == expected
    assert all(c[-1].finish_reason in ("stop", "length") for c in got)
    overlap_cluster.wait_pools_full()
