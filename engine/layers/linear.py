"""Column- and row-parallel linear layers.

Each layer holds only its rank's shard and knows how to slice a full checkpoint tensor into it
(`load`), so loading and tensor parallelism never leak into the model definition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import WeightLoadError
from engine.parallel import SINGLE, ParallelGroup


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise WeightLoadError(f"{name}: checkpoint shape {tuple(src.shape)} != expected {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src.to(dst.dtype))


class ColumnParallelLinear(nn.Module):
    """``y = x W^T (+ b)`` with the output features split across ranks.

    ``output_sizes`` lists the logical sub-matrices fused into this layer (q, k, v or gate, up);
    each is split across ranks separately so that rank r holds [q_r; k_r; v_r]. ``replicas[i]``
    ranks share one slice of sub-matrix i (KV heads when tp exceeds them): rank r then holds
    slice ``r // replicas[i]`` of ``tp / replicas[i]``.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = False,
        group: ParallelGroup = SINGLE,
        replicas: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.group = group
        self.replicas = replicas or [1] * len(output_sizes)
        self.output_sizes = [group.shard(n * r, "output size") for n, r in zip(output_sizes, self.replicas)]
        out = sum(self.output_sizes)
        self.weight = nn.Parameter(torch.empty(out, input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load(self, name: str, full: torch.Tensor, shard_id: int = 0, param: str = "weight") -> None:
        """Copy checkpoint tensor ``full`` (logical sub-matrix ``shard_id``) into our slice."""
        size = self.output_sizes[shard_id]
        start = sum(self.output_sizes[:shard_id])
        local = full.narrow(0, self.group.tp_rank // self.replicas[shard_id] * size, size)
        _copy_checked(getattr(self, param).narrow(0, start, size), local, name)


class RowParallelLinear(nn.Module):
    """``y = x W^T`` with the input features split across ranks, then summed (all-reduce)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, group: ParallelGroup = SINGLE):
        super().__init__()
        self.group = group
        self.input_size = group.shard(input_size, "input size")
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias

    def load(self, name: str, full: torch.Tensor, shard_id: int = 0, param: str = "weight") -> None:
        if param == "bias":
            _copy_checked(self.bias, full, name)
            return
        local = full.narrow(1, self.group.tp_rank * self.input_size, self.input_size)
        _copy_checked(self.weight, local, name)


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split across ranks (masked lookup + all-reduce)."""

    def __init__(self, vocab_size: int, dim: int, group: ParallelGroup = SINGLE) -> None:
        super().__init__()
        self.group = group
        self.vocab_size = vocab_size
        self.shard_size = (vocab_size + group.tp_size - 1) // group.tp_size
        self.start = group.tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local >= 0) & (local < self.shard_size)
        out = F.embedding(local.clamp(0, self.shard_size - 1), self.weight) * mask[..., None]
        return self.group.all_reduce(out)

    def load(self, name: str, full: torch.Tensor, shard_id: int = 0, param: str = "weight") -> None:
        n = min(self.shard_size, self.vocab_size - self.start)
        with torch.no_grad():
            self.weight.zero_()
        _copy_checked(self.weight.narrow(0, 0, n), full.narrow(0, self.start, n), name)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection sharing the embedding's vocab split (and, when tied, its weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, D] -> logits [N, V], float32
        # Logits rounded to bf16 tie exactly (one bf16 step is ~0.03 at |logit| ~ 5): greedy
        # then picks by token id and flips on any rounding change. A float32 result of the
        # same bf16 GEMM costs nothing extra; CPU has no mixed-output mm, so it upcasts after.
        if x.is_cuda and x.dtype != torch.float32:
            logits = torch.mm(x.reshape(-1, x.shape[-1]), self.weight.t(), out_dtype=torch.float32)
            logits = logits.reshape(*x.shape[:-1], -1)
        else:
            logits = F.linear(x, self.weight).float()
        return self.group.all_gather_last_dim(logits)[..., : self.vocab_size]
