"""Checkpoint loading: HF safetensors folders and GGUF files, both yielding transformers' tensor names."""

from __future__ import annotations

from engine.weights.checkpoint import iter_checkpoint, resolve_model
from engine.weights.gguf_file import config_from_gguf, read_metadata
from engine.weights.layout import expected_shapes

__all__ = ["config_from_gguf", "expected_shapes", "iter_checkpoint", "read_metadata", "resolve_model"]
