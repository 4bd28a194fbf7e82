"""Frozen engine configuration.

`ModelConfig` is parsed once from a Hugging Face ``config.json`` (or built from GGUF metadata)
and validated here, so the model code can trust every field. Derived sizes are properties.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.errors import DeviceUnavailableError, ModelNotFoundError, UnsupportedModelError
from engine.moe_config import MoEConfig, moe_config_from_hf

# architecture name in config.json -> family flags
SUPPORTED_ARCHITECTURES: dict[str, dict[str, bool]] = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"attention_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
    "MixtralForCausalLM": {},
    "Qwen2MoeForCausalLM": {"attention_bias": True},
    "Qwen3MoeForCausalLM": {"qk_norm": True},
}

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype: unknown {name!r}; expected one of {sorted(_DTYPES)}") from None


def cuda_unavailable_reason() -> str | None:
    """Why ``device: cuda`` cannot run here, or None when it can.

    Checked at configuration time so the user reads one line instead of torch's
    ``AssertionError: Torch not compiled with CUDA enabled`` from deep inside model loading.
    """
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"cuda requested, but this torch ({torch.__version__}) is a CPU-only build; use device cpu"
    return "cuda requested, but torch sees no CUDA GPU on this machine; use device cpu"


def check_device(device: str) -> None:
    """Raise `DeviceUnavailableError` for a ``cuda``/``cuda:N`` device this machine cannot run."""
    if device.split(":")[0] == "cuda" and (why := cuda_unavailable_reason()) is not None:
        raise DeviceUnavailableError(f"device: {why}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of one Llama-family model."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None
    moe: MoEConfig | None = None  # routed experts (Mixtral, Qwen-MoE); None for a dense model
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else _arch_from_model_type(cfg.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        flags = SUPPORTED_ARCHITECTURES[arch]
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // num_heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        rope_scaling = cfg.get("rope_scaling")
        rope_theta = cfg.get("rope_theta")
        rope_params = cfg.get("rope_parameters")  # transformers >= 5 nests rope settings here
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind in (None, "default"):
                rope_scaling = None
            elif kind != "llama3":
                raise UnsupportedModelError(f"rope_scaling type {kind!r} is not supported (only llama3)")
        use_sw = cfg.get("use_sliding_window", arch == "MistralForCausalLM")
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", flags.get("attention_bias", False))),
            qk_norm=flags.get("qk_norm", False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=cfg.get("sliding_window") if use_sw else None,
            moe=moe_config_from_hf(arch, cfg),
        )

    @classmethod
    def from_model_dir(cls, path: str | Path) -> ModelConfig:
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ModelNotFoundError(f"model config not found: {p}")
        return cls.from_hf_dict(json.loads(p.read_text()))

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def _arch_from_model_type(model_type: str | None) -> str:
    return {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "mixtral": "MixtralForCausalLM",
        "qwen2_moe": "Qwen2MoeForCausalLM",
        "qwen3_moe": "Qwen3MoeForCausalLM",
    }.get(model_type or "", f"<model_type {model_type!r}>")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing. ``num_blocks`` wins over ``memory_bytes`` when both are set."""

    block_size: int = 16
    memory_bytes: int = 256 * 2**20
    num_blocks: int | None = None
    dtype: torch.dtype | None = None  # None: the model dtype; torch.float8_e4m3fn for FP8 KV
    enable_prefix_caching: bool = True
    watermark: float = 0.01

    def __post_init__(self) -> None:
        if not 16 <= self.block_size <= 128 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: must be a power of two in 16..128, got {self.block_size}")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark: must be in [0, 1), got {self.watermark}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching limits: tokens per step (chunked prefill) and sequences per batch."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ParallelConfig:
    """Where this engine sits in its worker group: ``tp_size x pp_size`` ranks, global rank
    ``pp_rank * tp_size + tp_rank``. ``ep_size`` splits an MoE model's experts over the tensor
    ranks of a stage (1, or equal to ``tp_size``). The model's parallel group and the KV
    compatibility key are derived from here."""

    tp_size: int = 1
    pp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    ep_size: int = 1

    def __post_init__(self) -> None:
        for name in ("tp_size", "pp_size", "ep_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        for name, size in (("tp_rank", self.tp_size), ("pp_rank", self.pp_size)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < size:
                raise ValueError(f"{name}: must be in [0, {size}), got {value!r}")
        if self.ep_size not in (1, self.tp_size):
            raise ValueError(f"ep_size: must be 1 or tp_size ({self.tp_size}), got {self.ep_size}")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def rank(self) -> int:
        """This rank's index in the group's torch.distributed world."""
        return self.pp_rank * self.tp_size + self.tp_rank

    def for_rank(self, rank: int) -> ParallelConfig:
        """The same group seen from global rank ``rank``."""
        return dataclasses.replace(self, tp_rank=rank % self.tp_size, pp_rank=rank // self.tp_size)

    def compat(self) -> dict[str, int]:
        """The head and layer split two workers must share for their KV blocks to match."""
        return {"tp_size": self.tp_size, "tp_rank": self.tp_rank, "pp_size": self.pp_size, "pp_rank": self.pp_rank}


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine instance needs; workers derive theirs with `dataclasses.replace`."""

    model: str
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 0
    random_weights: bool = False  # speed runs on real shapes without a checkpoint
    # attention kernels in float64, bit-identical to the torch references (slow; for checks
    # and reproducible runs, see gpu_kernels/exact_attention.py); no effect on CPU
    exact_attention: bool = False
    # decode steps replayed from CUDA graphs (`engine.cuda_graphs`); on CPU the same padded
    # persistent inputs run eagerly. False: decode runs eagerly, unpadded
    cuda_graphs: bool = True
    # on CUDA: size the KV pool to this fraction of the device's memory, less what is in use
    # after loading the weights and what activations and graphs need (`engine.kv_budget`);
    # None: ``cache.memory_bytes`` (or ``cache.num_blocks``) as given. No effect on CPU.
    gpu_memory_utilization: float | None = None
    # schedule and launch decode step N+1 before reading step N's tokens (`engine.async_step`);
    # off by default: a step then returns the previous decode step's outputs
    overlap_scheduling: bool = False

    def __post_init__(self) -> None:
        check_device(self.device)
        u = self.gpu_memory_utilization
        if u is not None and (isinstance(u, bool) or not isinstance(u, int | float) or not 0.0 < u <= 1.0):
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {u!r}")
