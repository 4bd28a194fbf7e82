"""Random paged batches for the kernel tests and benchmarks (CPU and GPU alike).

Blocks are handed out in a shuffled order, so a kernel that assumes a sequence's blocks are
contiguous, or indexes the pool by sequence, reads the wrong KV and fails. KV is drawn in
float32 and cast (FP8 through the reference quantiser), so the pool holds exactly the values
the reference dequantises. Pools in a float dtype are drawn in that dtype.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from gpu_kernels.reference import fp8_quantize


@dataclass
class PagedBatch:
    """One layer's KV pool plus a varlen batch over it (``q`` holds only the new tokens)."""

    q: torch.Tensor  # [T, Hq, D]
    kv_layer: torch.Tensor  # [num_blocks, 2, Hkv, page, D]
    block_tables: torch.Tensor  # [B, max_blocks] int32
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    scale: float

    @property
    def max_query_len(self) -> int:
        return int((self.query_start_loc[1:] - self.query_start_loc[:-1]).max().item())


def case_seed(*parts: object) -> int:
    """A seed fixed per test case (reproducible failures) but different between cases."""
    return zlib.crc32(repr(parts).encode())


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives inf."""
    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return float("inf")
    denom = r.norm().item()
    return (o - r).norm().item() / (denom if denom > 0 else 1.0)


def make_kv_pool(
    num_blocks: int,
    num_kv_heads: int,
    page: int,
    head_dim: int,
    kv_dtype: torch.dtype,
    device: torch.device | str,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A pool of random KV; FP8 pools also get random per-tensor scales."""
    shape = (num_blocks, 2, num_kv_heads, page, head_dim)
    if kv_dtype != torch.float8_e4m3fn:  # drawn in its own dtype: benchmark pools are tens of GiB
        return torch.randn(shape, generator=gen, device=device, dtype=kv_dtype), None, None
    kv = torch.randn(shape, generator=gen, device=device)
    scales = 0.5 + torch.rand(2, generator=gen, device=device)
    k_scale, v_scale = scales[0].clone(), scales[1].clone()
    kv[:, 0] = fp8_quantize(kv[:, 0] * k_scale, k_scale).float()
    kv[:, 1] = fp8_quantize(kv[:, 1] * v_scale, v_scale).float()
    return kv.to(kv_dtype), k_scale, v_scale


def make_paged_batch(
    q_lens: list[int],
    seq_lens: list[int],
    *,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    page: int,
    dtype: torch.dtype,
    kv_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    spare_blocks: int = 3,
) -> PagedBatch:
    """Sequence ``b`` has ``seq_lens[b]`` tokens of KV, the last ``q_lens[b]`` of them new."""
    if len(q_lens) != len(seq_lens) or any(ql > sl for ql, sl in zip(q_lens, seq_lens)):
        raise ValueError("q_lens: each entry must be <= its seq_lens entry, same length")
    gen = torch.Generator(device=device).manual_seed(seed)
    batch = len(seq_lens)
    per_seq = [max(1, -(-sl // page)) for sl in seq_lens]
    max_blocks = max(per_seq)
    num_blocks = sum(per_seq) + spare_blocks
    kv, k_scale, v_scale = make_kv_pool(
        num_blocks, num_kv_heads, page, head_dim, kv_dtype or dtype, device, gen
    )
    perm = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)
    # rows are padded with a real-but-foreign block id, so a kernel that reads past a
    # sequence's length reads someone else's KV and fails loudly
    tables = torch.full((batch, max_blocks), int(perm[-1]), dtype=torch.int32, device=device)
    at = 0
    for b, n in enumerate(per_seq):
        tables[b, :n] = perm[at : at + n]
        at += n
    qsl = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    qsl[1:] = torch.tensor(q_lens, device=device).cumsum(0)
    q = torch.randn((sum(q_lens), num_kv_heads * group, head_dim), generator=gen, device=device).to(dtype)
    return PagedBatch(
        q=q,
        kv_layer=kv,
        block_tables=tables,
        query_start_loc=qsl,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        k_scale=k_scale,
        v_scale=v_scale,
        scale=head_dim**-0.5,
    )
