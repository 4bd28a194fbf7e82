"""Helpers of the data-plane tests: worker specs, a handle on one prefill + decode pair."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cluster.local_workers import WorkerProcess
from decode_worker.messages import PrefillTarget
from engine.sampling_params import SamplingParams
from protocol.decode_client import DecodeClient
from protocol.prefill_client import PrefillClient
from protocol.proto import worker_pb2 as pb
from protocol.stream import TokenChunk
from protocol.worker_spec import WorkerSpec

TOKEN = "test-cluster-token"
BLOCK_SIZE = 16
PREFILL_CHUNK = 64  # the prefill worker's token budget per step: long prompts are chunked
MAX_MODEL_LEN = 1024
LEASE_S = 3.0  # decode holds blocks this long for a silent prefill worker
BACKENDS = ["nixl", "tcp", "ucxx", "mpi"]


def worker_spec(role: str, model: str | Path, backend: str, **kw: object) -> WorkerSpec:
    base: dict[str, object] = dict(
        role=role, model=str(model), transport=backend, block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN,
        num_kv_blocks=256, num_threads=1, lease_s=LEASE_S,
        max_num_batched_tokens=PREFILL_CHUNK if role == "prefill" else 512,
    )
    base.update(kw)
    return WorkerSpec.from_dict(base)


@dataclass
class Cluster:
    backend: str
    prefill: WorkerProcess
    decode: WorkerProcess
    client: DecodeClient
    prefill_client: PrefillClient

    @property
    def target(self) -> PrefillTarget:
        return PrefillTarget(self.prefill.worker_id, self.prefill.address)

    def generate(self, prompt: list[int], params: SamplingParams, *, remote: bool = True,
                 **kw: object) -> list[TokenChunk]:
        stream = self.client.generate(
            f"req-{uuid.uuid4().hex[:12]}", prompt, params, prefill=self.target if remote else None, **kw,
        )
        return list(stream)

    def statuses(self) -> tuple[pb.WorkerStatus, pb.WorkerStatus]:
        return self.prefill_client.status(), self.client.status()

    def wait_pools_full(self, timeout: float = 15.0) -> tuple[pb.WorkerStatus, pb.WorkerStatus]:
        """Both pools back to full, nothing running or leased, bookkeeping consistent."""
        deadline = time.monotonic() + timeout
        while True:
            p, d = self.statuses()
            idle = all(s.num_free_blocks == s.num_total_blocks and s.num_running == 0 and s.num_waiting == 0
                       for s in (p, d)) and d.num_leases == 0
            if idle and not p.integrity_error and not d.integrity_error:
                return p, d
            if time.monotonic() > deadline:
                raise AssertionError(f"pools not back to full:\nprefill {p}\ndecode {d}")
            time.sleep(0.1)


def tokens_of(chunks: list[TokenChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


