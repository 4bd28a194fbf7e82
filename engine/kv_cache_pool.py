"""`KVCachePool`: the preallocated paged KV tensors of one worker.

Layout (one contiguous tensor, registered once with a KV transport)::

    kv[layer, block, kv_index, kv_head, slot, head_dim]     kv_index: 0 = K, 1 = V
    shape  [num_layers, num_blocks, 2, num_kv_heads, block_size, head_dim]

Why this order:

* ``kv[layer]`` is a contiguous ``[num_blocks, 2, H, bs, D]`` slab, so a *run of consecutive
  block ids of one layer* (K and V together) is one contiguous byte range: a layer-wise push of
  a sequence's blocks is one descriptor per run of contiguous block ids, issued as soon as that
  layer's compute is done.
* The whole KV of one block across all layers is ``num_layers`` descriptors of
  ``block_bytes_per_layer`` each, at a fixed stride (``layer_stride_bytes``).
* Within a block, heads come before slots (HND): the decode kernel that handles one KV head
  reads a contiguous ``[block_size, head_dim]`` tile for K and for V.

FP8 KV (``torch.float8_e4m3fn``) stores scaled values; ``k_scale``/``v_scale`` are per-tensor
scales that kernels multiply back on the fly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import CacheConfig, ModelConfig


@dataclass(frozen=True)
class KVLayout:
    """Everything a peer needs to interpret our pool's bytes (part of the transfer handshake)."""

    num_layers: int
    num_blocks: int
    num_kv_heads: int
    block_size: int
    head_dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (self.num_layers, self.num_blocks, 2, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def block_bytes_per_layer(self) -> int:
        """Bytes of one block (K and V) in one layer: the unit of a transfer descriptor."""
        return 2 * self.num_kv_heads * self.block_size * self.head_dim * self.element_size

    @property
    def layer_stride_bytes(self) -> int:
        return self.num_blocks * self.block_bytes_per_layer

    @property
    def total_bytes(self) -> int:
        return self.num_layers * self.layer_stride_bytes

    def compat_key(self) -> tuple[object, ...]:
        """What two workers must agree on for their blocks to be interchangeable."""
        return (self.num_layers, self.num_kv_heads, self.block_size, self.head_dim, str(self.dtype))

    @classmethod
    def for_budget(
        cls, model: ModelConfig, cache: CacheConfig, model_dtype: torch.dtype, num_kv_heads: int | None = None
    ) -> KVLayout:
        dtype = cache.dtype or model_dtype
        heads = num_kv_heads or model.num_kv_heads
        probe = cls(model.num_layers, 1, heads, cache.block_size, model.head_dim, dtype)
        num_blocks = cache.num_blocks or cache.memory_bytes // (probe.block_bytes_per_layer * model.num_layers)
        if num_blocks < 1:
            raise ValueError(
                f"kv memory budget {cache.memory_bytes} bytes is below one block "
                f"({probe.block_bytes_per_layer * model.num_layers} bytes)"
            )
        return cls(model.num_layers, int(num_blocks), heads, cache.block_size, model.head_dim, dtype)


class KVCachePool:
    """Owns the KV tensor; the `BlockManager` owns which blocks are in use."""

    def __init__(self, layout: KVLayout, device: torch.device | str = "cpu") -> None:
        self.layout = layout
        self.device = torch.device(device)
        self.kv = torch.zeros(layout.shape, dtype=layout.dtype, device=self.device)
        # per-tensor FP8 scales (1.0 for non-FP8 pools; kernels ignore them then)
        self.k_scale = torch.ones((), dtype=torch.float32, device=self.device)
        self.v_scale = torch.ones((), dtype=torch.float32, device=self.device)

    @property
    def num_blocks(self) -> int:
        return self.layout.num_blocks

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    def layer(self, i: int) -> torch.Tensor:
        """``[num_blocks, 2, num_kv_heads, block_size, head_dim]`` view of layer ``i``."""
        return self.kv[i]

    def block_offset_bytes(self, layer: int, block: int) -> int:
        """Byte offset of (layer, block) from the pool's base address."""
        return layer * self.layout.layer_stride_bytes + block * self.layout.block_bytes_per_layer

    def data_ptr(self) -> int:
        return self.kv.data_ptr()
