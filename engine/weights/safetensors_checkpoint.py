"""Streaming the tensors of an HF model folder: one ``model.safetensors`` or an indexed set of shards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from engine.errors import ModelNotFoundError, WeightLoadError
from engine.weights.lazy_tensor import LazySlice

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def shard_files(folder: Path) -> list[tuple[Path, list[str]]]:
    """(shard path, tensor names in it) in a stable order; raises when a listed shard is absent."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise WeightLoadError(f"{index}: not a safetensors index ({e})") from e
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        shards = []
        for file in sorted(by_file):
            p = folder / file
            if not p.is_file():
                raise ModelNotFoundError(f"{index} lists shard {file}, which is not in {folder}")
            shards.append((p, by_file[file]))
        return shards
    single = folder / SINGLE_FILE
    if single.is_file():
        return [(single, _names_in(single))]
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(found) == 1:  # a lone differently named file (e.g. after a rename) is unambiguous
        return [(folder / found[0], _names_in(folder / found[0]))]
    raise ModelNotFoundError(
        f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}"
        + (f" (found {found}: ambiguous without an index)" if found else "")
    )


def _names_in(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def iter_safetensors(
    shards: list[tuple[Path, list[str]]], lazy: bool = False
) -> Iterator[tuple[str, torch.Tensor | LazySlice]]:
    """(name, tensor) in the stored dtype; one shard is open at a time and tensors are read lazily.

    With ``lazy`` a `LazySlice` comes instead, to be used before the next one is asked for: a rank
    of a sharded group reads only its part of it.
    """
    from safetensors import SafetensorError, safe_open

    for path, names in shards:
        try:
            with safe_open(str(path), framework="pt") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise WeightLoadError(f"{path.name}: index lists {name!r}, the shard lacks it")
                    yield name, (LazySlice(f.get_slice(name)) if lazy else f.get_tensor(name))
        except SafetensorError as e:
            raise WeightLoadError(f"{path}: unreadable safetensors file ({e})") from e
