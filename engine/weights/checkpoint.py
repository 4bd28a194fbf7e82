"""One entry point for every checkpoint format: a model folder or a ``.gguf`` file in, HF-named tensors out.

Callers (the model loader, the converter in `engine.model_store`) never branch on the format; they
get transformers' tensor names, shapes checked against the config, and a progress bar.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from engine.config import ModelConfig
from engine.errors import ModelNotFoundError
from engine.weights.gguf_checkpoint import iter_gguf, num_tensors
from engine.weights.gguf_file import config_from_gguf, gguf_architecture, read_metadata
from engine.weights.layout import LayoutChecker
from engine.weights.safetensors_checkpoint import iter_safetensors, shard_files


def resolve_model(path: str | Path) -> tuple[dict[str, Any], Path]:
    """``(config.json dict, weights source)`` for a model folder or a ``.gguf`` file.

    The source is what `iter_checkpoint` takes. A folder that holds no config.json but exactly one
    ``.gguf`` resolves to that file, so a folder of downloaded GGUFs can be named directly.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"model not found: {p}")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"{p}: expected a model folder or a .gguf file")
        return config_from_gguf(p), p
    cfg_path = p / "config.json"
    if cfg_path.is_file():
        return json.loads(cfg_path.read_text()), p
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return config_from_gguf(ggufs[0]), ggufs[0]
    raise ModelNotFoundError(
        f"{p}: no config.json" + (f" and {len(ggufs)} .gguf files (name one)" if ggufs else "")
    )


def iter_checkpoint(
    path: str | Path,
    config: ModelConfig | None = None,
    *,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    lazy: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(HF name, tensor)`` for every weight, checking each shape against ``config``.

    ``config`` defaults to the checkpoint's own; pass the one the model was built from to catch a
    config/weights mismatch. Tensors come in the stored dtype (GGUF: dequantized float32) unless
    ``dtype`` is given. After the last tensor a missing one raises `WeightLoadError`. ``lazy``
    (safetensors only) yields `LazySlice`s that read just the part a sharded rank narrows them to.
    """
    cfg_dict, source = resolve_model(path)  # eager: a bad path fails at the call, not at first next()
    cfg = config if config is not None else ModelConfig.from_hf_dict(cfg_dict)
    if source.is_file():
        arch = gguf_architecture(read_metadata(source))
        total = num_tensors(source)
        tensors = iter_gguf(source, arch, cfg.num_heads, cfg.num_kv_heads)
    else:
        shards = shard_files(source)
        total = sum(len(names) for _, names in shards)
        tensors = iter_safetensors(shards, lazy=lazy)
    return _checked(tensors, LayoutChecker(cfg, source.name), total, dtype, progress)


def _checked(
    tensors: Iterator[tuple[str, torch.Tensor]],
    checker: LayoutChecker,
    total: int,
    dtype: torch.dtype | None,
    progress: bool,
) -> Iterator[tuple[str, torch.Tensor]]:
    desc = f"loading {checker.source}"
    bar = tqdm(total=total, desc=desc, unit="tensor", disable=not progress, leave=False)
    with bar:
        for name, tensor in tensors:
            bar.update(1)
            if not checker.accept(name, tensor):
                continue
            yield name, (tensor if dtype is None else tensor.to(dtype))  # a LazySlice reads here
    checker.finish()
