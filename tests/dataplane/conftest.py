"""Real worker processes for the data-plane tests: one prefill + one decode per KV backend.

Workers are started once per backend for the whole session (both test modules share them)
and a test that needs a clean slate waits for the pools to drain instead of restarting. Each
worker gets one torch thread: CI has two cores, and three model processes share them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.local_workers import WorkerProcess
from engine.sampling_params import SamplingParams
from protocol.decode_client import DecodeClient
from protocol.prefill_client import PrefillClient
from tests.dataplane.harness import BACKENDS, BLOCK_SIZE, MAX_MODEL_LEN, TOKEN, Cluster, worker_spec


@pytest.fixture(scope="session", params=BACKENDS)
def cluster(request: pytest.FixtureRequest, smollm2_path: Path) -> Iterator[Cluster]:
    backend = request.param
    launcher = None
    if backend == "mpi":  # ranks of one MPI job (the mpi transport's requirement)
        from tests.dataplane.mpi_workers import start_mpi_pair

        launcher, prefill, decode = start_mpi_pair(smollm2_path)
    else:
        prefill = WorkerProcess(worker_spec("prefill", smollm2_path, backend), TOKEN)
        decode = WorkerProcess(worker_spec("decode", smollm2_path, backend), TOKEN)
    try:
        if launcher is None:
            prefill.spawn()
            decode.spawn()  # both load their model at once
            prefill.wait_ready()
            decode.wait_ready()
        with DecodeClient(decode.address, TOKEN) as client, PrefillClient(prefill.address, TOKEN) as pclient:
            cluster = Cluster(backend, prefill, decode, client, pclient)
            warm_up = SamplingParams(temperature=0.0, max_tokens=2)  # first steps of a process are slow
            cluster.generate(list(range(100, 180)), warm_up)
            cluster.generate(list(range(200, 280)), warm_up, remote=False)
            yield cluster
    finally:
        codes = decode.stop(), prefill.stop()
        if launcher is not None:
            launcher.close()
    assert codes == (0, 0), f"unclean shutdown on SIGTERM:\n{decode.log_tail()}\n{prefill.log_tail()}"


@pytest.fixture(scope="session")
def reference(smollm2_path: Path):
    """The offline engine, same model and block size: the tokens every path must reproduce."""
    from engine.llm import LLM

    return LLM(smollm2_path, block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN)
