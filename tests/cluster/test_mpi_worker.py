"""``mpirun -n N splitserve worker --config FILE``: rank -> worker by the config, and a real
2-rank job whose workers move a prompt's KV over the mpi transport and answer like the
offline `LLM`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.config import ConfigError, config_from_dict
from cluster.mpi_launcher import find_mpiexec
from splitserve.mpi_worker import job_position, rank_spec

ROOT = Path(__file__).resolve().parents[2]


def test_ranks_map_to_prefill_then_decode_workers() -> None:
    config = config_from_dict({"prefill": {"replicas": 2}, "decode": {"replicas": 1}})
    roles = [(s.role, s.worker_id) for s in (rank_spec(config, "/m", r, 3) for r in range(3))]
    assert roles == [("prefill", "prefill-0"), ("prefill", "prefill-1"), ("decode", "decode-0")]
    with pytest.raises(ConfigError, match=r"the config has 3 workers but the MPI job has 2 ranks \(mpirun -n 3\)"):
        rank_spec(config, "/m", 0, 2)
    with pytest.raises(ConfigError, match="rank 5"):
        rank_spec(config, "/m", 5, None)


def test_rank_comes_from_the_process_manager() -> None:
    assert job_position({"PMI_RANK": "1", "PMI_SIZE": "2"}) == (1, 2)
    assert job_position({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "3"}) == (0, 3)
    assert job_position({}, rank=2) == (2, None)
    with pytest.raises(ConfigError, match="no MPI rank"):
        job_position({})


@pytest.mark.slow
def test_two_rank_job_serves_a_disaggregated_request(tmp_path: Path, smollm2_path: Path) -> None:
    from decode_worker.messages import PrefillTarget
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from protocol.decode_client import DecodeClient

    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("kvtransfer:\n  backend: mpi\nkv_cache_memory: 64MiB\n")
    token = "mpi-worker-test-token"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPLITSERVE_CLUSTER_TOKEN": token}
    env.pop("SPLITSERVE_REDIS_URL", None)
    log = tmp_path / "job.log"
    with open(log, "w") as out:
        job = subprocess.Popen([find_mpiexec(), "-n", "2", sys.executable, "-m", "splitserve", "worker",
                                "--config", str(cfg)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        ready: dict[str, dict[str, object]] = {}
        deadline = time.monotonic() + 240
        while len(ready) < 2:
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            for line in log.read_text().splitlines():
                if line.startswith("READY "):
                    info = json.loads(line[6:])
                    ready[str(info["role"])] = info
            time.sleep(0.2)
        reference = LLM(smollm2_path, block_size=16)
        ids = reference.tokenizer.encode("A list of ten fruits, one per line, in alphabetical order: " * 3)
        params = SamplingParams(max_tokens=6, temperature=0.0)
        expected = reference.generate([ids], params)[0].token_ids
        prefill = PrefillTarget(str(ready["prefill"]["worker_id"]), str(ready["prefill"]["address"]))
        with DecodeClient(str(ready["decode"]["address"]), token) as client:
            chunks = list(client.generate("mpi-job-req", ids, params, prefill=prefill))
        assert [t for c in chunks for t in c.token_ids] == expected
    finally:
        os.killpg(job.pid, 15)
        job.wait(60)
