"""`LazySlice`: a checkpoint tensor that is read from disk only when used, and only the part used.

A rank of a tensor/pipeline group needs a slice of most weights (its heads, its vocab rows, its
experts) and none of another stage's layers. The layers' loaders already cut their shard with
``narrow`` and copy it with ``.to(dtype)``; a `LazySlice` records the narrows and reads just that
box from the safetensors file on ``.to`` (safetensors' ``get_slice``), so a rank's read traffic
and peak memory scale with its shard, not with the model.
"""

from __future__ import annotations

from typing import Any

import torch


class LazySlice:
    """A box ``[start, stop)`` per dim of a stored tensor; ``bytes_read`` counts what was read (tests)."""

    bytes_read = 0

    def __init__(self, source: Any, box: tuple[tuple[int, int], ...] | None = None) -> None:
        self._source = source  # a safetensors PySafeSlice (valid while its file is open)
        self._box = box if box is not None else tuple((0, n) for n in source.get_shape())

    @property
    def shape(self) -> torch.Size:
        return torch.Size(b - a for a, b in self._box)

    def dim(self) -> int:
        return len(self._box)

    def narrow(self, dim: int, start: int, length: int) -> LazySlice:
        dim = dim % len(self._box)
        a, b = self._box[dim]
        if start < 0 or length < 0 or a + start + length > b:
            raise IndexError(f"narrow({dim}, {start}, {length}) outside a dimension of size {b - a}")
        box = list(self._box)
        box[dim] = (a + start, a + start + length)
        return LazySlice(self._source, tuple(box))

    def read(self) -> torch.Tensor:
        """The box's values, read from the file now."""
        t = self._source[tuple(slice(a, b) for a, b in self._box)] if self._box else self._source[:]
        LazySlice.bytes_read += t.numel() * t.element_size()
        return t

    def to(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self.read()
        return t if dtype is None else t.to(dtype)


def materialize(t: torch.Tensor | LazySlice) -> torch.Tensor:
    return t.read() if isinstance(t, LazySlice) else t
