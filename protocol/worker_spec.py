"""`WorkerSpec`: everything one prefill or decode worker process needs, as one small JSON object.

The launcher (local processes today, Ray tomorrow) writes it; `worker_runtime.main` reads it.
It is validated once here, with errors that name the field. The cluster token is not part of
the JSON on purpose: command lines are visible to every local user, so it travels in the
``SPLITSERVE_CLUSTER_TOKEN`` environment variable.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig, parse_dtype
from protocol.grpc_auth import GrpcTls

TOKEN_ENV = "SPLITSERVE_CLUSTER_TOKEN"
Role = Literal["prefill", "decode"]
ROLES: tuple[Role, ...] = ("prefill", "decode")


class WorkerSpecError(ValueError):
    """A worker spec is invalid; the message names the field."""


@dataclass(frozen=True)
class WorkerSpec:
    role: Role
    model: str  # HF folder or .gguf file
    worker_id: str = ""  # defaults to "<role>-<port>" once bound
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    kv_cache_memory: int = 64 * 2**20
    num_kv_blocks: int | None = None  # wins over kv_cache_memory
    max_num_batched_tokens: int = 512  # prefill: the token budget per step (chunk size)
    max_num_seqs: int = 64
    max_model_len: int | None = None  # None: min(model's max positions, 4096), as `LLM`
    enable_prefix_caching: bool = True
    transport: str = "tcp"  # a kvtransfer registry name: "nixl", "tcp", ...
    transport_options: dict[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port; the bound one is printed and written to ready_file
    ready_file: str | None = None
    lease_s: float = 10.0  # decode: how long blocks wait for a silent prefill worker
    request_timeout_s: float = 0.0  # decode: default per-request deadline, 0 = none
    transfer_timeout_s: float = 10.0  # prefill: how long one step's KV writes may take
    grpc_workers: int = 256  # decode: one thread per open Generate stream
    max_queued_requests: int = 0  # prefill: its own admission limit (RESOURCE_EXHAUSTED past it), 0 = none
    max_queued_prompt_tokens: int = 0  # prefill: likewise for prompt tokens not yet computed, 0 = none
    # gRPC TLS (PEM paths): serve with cert+key, verify peers with the CA; all empty: plain gRPC
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    num_threads: int = 0  # torch intra-op threads, 0 = torch's default
    random_weights: bool = False
    seed: int = 0
    exact_attention: bool = False  # float64 attention kernels, the references' bits (slow)
    tp_size: int = 1  # tensor-parallel group size
    pp_size: int = 1  # pipeline-parallel group size
    tp_rank: int = 0
    pp_rank: int = 0
    ep_size: int = 1  # MoE experts split over the tensor ranks (1 or tp_size)
    group_address: str = ""  # host:port where a tp x pp group's ranks rendezvous (set by the launcher)
    cuda_graphs: bool = True  # decode steps from CUDA graphs (engine.cuda_graphs)
    gpu_memory_utilization: float | None = None  # KV pool from free GPU memory (engine.kv_budget)
    overlap_scheduling: bool = False  # decode: launch step N+1 before reading step N (engine.async_step)
    kv_groups: bool = False  # KV between groups of different tp/pp: every rank its own transport (group_transport)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise WorkerSpecError(f"role: must be one of {ROLES}, got {self.role!r}")
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs", "grpc_workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise WorkerSpecError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        if not 0 <= self.port < 65536:
            raise WorkerSpecError(f"port: must be in 0..65535, got {self.port}")
        for name in ("lease_s", "transfer_timeout_s"):
            if getattr(self, name) <= 0:
                raise WorkerSpecError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("max_queued_requests", "max_queued_prompt_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise WorkerSpecError(f"{name}: must be an integer >= 0 (0: no limit), got {getattr(self, name)!r}")
        if self.request_timeout_s < 0:
            raise WorkerSpecError(f"request_timeout_s: must be >= 0, got {self.request_timeout_s}")
        tls = (self.tls_cert_file, self.tls_key_file, self.tls_ca_file)
        if any(tls) and not all(tls):
            raise WorkerSpecError("tls_cert_file, tls_key_file, tls_ca_file: give all three or none")
        u = self.gpu_memory_utilization
        if u is not None and (isinstance(u, bool) or not isinstance(u, int | float) or not 0 < u <= 1):
            raise WorkerSpecError(f"gpu_memory_utilization: must be in (0, 1], got {u!r}")
        try:
            parse_dtype(self.dtype)
            self.parallel_config()
        except ValueError as e:
            raise WorkerSpecError(str(e)) from None

    def grpc_tls(self) -> GrpcTls | None:
        if not self.tls_cert_file:
            return None
        return GrpcTls(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(
            tp_size=self.tp_size, pp_size=self.pp_size, tp_rank=self.tp_rank, pp_rank=self.pp_rank, ep_size=self.ep_size
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        for k in d:
            if k not in known:
                raise WorkerSpecError(f"{k}: unknown worker spec field")
        for f in dataclasses.fields(cls):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and f.name not in d:
                raise WorkerSpecError(f"{f.name}: required")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls.from_dict(json.loads(text))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    def replace(self, **kw: Any) -> WorkerSpec:
        return dataclasses.replace(self, **kw)

    def engine_config(self) -> EngineConfig:
        from engine.weights import resolve_model

        model_cfg = ModelConfig.from_hf_dict(resolve_model(Path(self.model))[0])
        max_len = self.max_model_len or min(model_cfg.max_position_embeddings, 4096)
        return EngineConfig(
            model=self.model,
            dtype=parse_dtype(self.dtype),
            device=self.device,
            cache=CacheConfig(
                block_size=self.block_size, memory_bytes=self.kv_cache_memory, num_blocks=self.num_kv_blocks,
                enable_prefix_caching=self.enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens,
                max_model_len=max_len,
            ),
            parallel=self.parallel_config(),
            seed=self.seed,
            random_weights=self.random_weights,
            exact_attention=self.exact_attention,
            cuda_graphs=self.cuda_graphs,
            gpu_memory_utilization=self.gpu_memory_utilization,
            overlap_scheduling=self.overlap_scheduling,
        )
