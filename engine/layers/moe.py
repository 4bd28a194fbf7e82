"""Mixture-of-Experts layers: top-k routing, the grouped expert MLP, expert-parallel dispatch/combine.

Experts are split over the ``ep`` ranks of a group (rank r holds experts ``[r*E/ep, (r+1)*E/ep)``).
Every rank sees the same tokens (attention is replicated or tensor-parallel), so each rank takes
its slice of the tokens, sends each (token, expert) pair to the rank owning the expert
(all-to-all), runs its local experts as one grouped GEMM over what it received, sends the results
back (all-to-all) and the ranks all-gather the token slices. ``all_to_all_single`` runs on NCCL
and on gloo alike (gloo accepts uneven splits), so one code path serves GPU and CPU groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import SplitserveError, WeightLoadError
from engine.parallel import SINGLE, ParallelGroup
from gpu_kernels import ops

# checkpoint names of one expert's projections -> slot in our fused weights
EXPERT_PARTS = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


class ExpertParallelError(SplitserveError, ValueError):
    """The expert-parallel shape cannot hold the model: its experts do not split evenly over ``ep``."""


@dataclass(frozen=True)
class ExpertParallel:
    """This rank's place among the ``size`` ranks that split a model's experts.

    ``group`` is the torch.distributed process group of those ranks (None: the default group).
    ``field`` is the config field the size came from, so a shape error names what to change.
    """

    rank: int = 0
    size: int = 1
    group: Any = None
    field: str = "decode.ep"

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ExpertParallelError(f"{self.field}: rank {self.rank} out of range for ep size {self.size}")

    def local_experts(self, num_experts: int) -> tuple[int, int]:
        """``(first expert, count)`` held here; raises `ExpertParallelError` when ``size`` does not divide."""
        if num_experts % self.size:
            raise ExpertParallelError(
                f"{self.field} = {self.size} does not divide the model's {num_experts} experts; "
                f"use an ep that divides {num_experts}"
            )
        n = num_experts // self.size
        return self.rank * n, n

    def token_slice(self, num_tokens: int) -> tuple[int, int]:
        """The tokens this rank dispatches: contiguous, sizes differ by at most one."""
        return self.rank * num_tokens // self.size, (self.rank + 1) * num_tokens // self.size


EP_SINGLE = ExpertParallel()


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts (float32), the ``top_k`` largest, optionally renormalised to sum to 1.

    Returns ``(weights [T, k] float32, expert ids [T, k] int64)``, largest first as in HF.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group: Any) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    torch.distributed.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


def ep_moe(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    ep: ExpertParallel,
) -> torch.Tensor:
    """The routed MoE output ``[T, H]`` with ``w13``/``w2`` this rank's experts, ``ids`` global."""
    if ep.size == 1:
        return ops.fused_moe(x, w13, w2, weights, ids)
    n_local = w13.shape[0]
    lo, hi = ep.token_slice(x.shape[0])
    k = ids.shape[1]
    pair_ids = ids[lo:hi].reshape(-1)
    dest = torch.div(pair_ids, n_local, rounding_mode="floor")
    order = torch.argsort(dest, stable=True)  # pairs grouped by owning rank
    send_counts = torch.bincount(dest, minlength=ep.size)
    recv_counts = torch.empty_like(send_counts)
    torch.distributed.all_to_all_single(recv_counts, send_counts, group=ep.group)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    tokens = torch.div(order, k, rounding_mode="floor") + lo
    got_x = _all_to_all(x[tokens], send, recv, ep.group)
    got_ids = _all_to_all((pair_ids[order] - dest[order] * n_local)[:, None], send, recv, ep.group)
    ones = torch.ones(got_ids.shape, dtype=torch.float32, device=x.device)
    y = ops.fused_moe(got_x, w13, w2, ones, got_ids)  # each received pair is a token with k = 1
    back = _all_to_all(y, recv, send, ep.group)
    per_pair = torch.empty_like(back)
    per_pair[order] = back
    mine = (per_pair.float().view(hi - lo, k, x.shape[1]) * weights[lo:hi, :, None]).sum(dim=1).to(x.dtype)
    return _gather_slices(mine, x.shape[0], ep)


def _gather_slices(mine: torch.Tensor, num_tokens: int, ep: ExpertParallel) -> torch.Tensor:
    """Every rank's token slice, concatenated in rank order (slices padded to one size for all_gather)."""
    width = -(-num_tokens // ep.size)
    padded = mine.new_zeros((width, mine.shape[1]))
    padded[: mine.shape[0]] = mine
    parts = [torch.empty_like(padded) for _ in range(ep.size)]
    torch.distributed.all_gather(parts, padded, group=ep.group)
    sizes = [ExpertParallel(r, ep.size).token_slice(num_tokens) for r in range(ep.size)]
    return torch.cat([p[: b - a] for p, (a, b) in zip(parts, sizes)])


class Router(nn.Module):
    """``x -> logits [T, out]`` with a replicated weight (every rank routes every token the same)."""

    def __init__(self, hidden_size: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class FusedMoE(nn.Module):
    """This rank's experts as two stacked weights: ``w13 [E_local, 2I', H]`` (gate | up), ``w2 [E_local, H, I']``.

    With ``ep > 1`` the experts are split over the ranks and each holds whole experts (``ep`` must
    then equal ``tp``: the ranks that split the attention heads split the experts). With ``ep = 1``
    and ``tp > 1`` every rank holds every expert's ``I' = I / tp`` slice of the intermediate
    dimension, like a row/column-parallel MLP, and the outputs are summed (one all-reduce).
    """

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, ep: ExpertParallel,
        group: ParallelGroup = SINGLE,
    ) -> None:
        super().__init__()
        if ep.size > 1 and group.tp_size not in (1, ep.size):
            raise ExpertParallelError(
                f"{ep.field} = {ep.size} with tp = {group.tp_size}: experts split over ep ranks need ep = tp "
                "(or ep = 1)"
            )
        self.ep = ep
        self.tp = group if ep.size == 1 else SINGLE  # expert slices over tp only when experts are not split
        self.first, self.num_local = ep.local_experts(num_experts)
        self.num_experts = num_experts
        self.full_inter = intermediate_size
        self.inter = self.tp.shard(intermediate_size, "expert intermediate size")
        self.w13 = nn.Parameter(torch.empty(self.num_local, 2 * self.inter, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.num_local, hidden_size, self.inter), requires_grad=False)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(ep_moe(x, weights, ids, self.w13, self.w2, self.ep))

    def _tp_slice(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.narrow(dim, self.tp.tp_rank * self.inter, self.inter)

    def load_expert(self, name: str, tensor: torch.Tensor, expert: int, part: str) -> bool:
        """Copy one expert's gate/up/down weight if it lives here; False when another rank holds it."""
        if not 0 <= expert < self.num_experts:
            raise WeightLoadError(f"{name}: expert {expert} out of range for {self.num_experts} experts")
        local = expert - self.first
        if not 0 <= local < self.num_local:
            return False
        h = self.w2.shape[1]
        want = (h, self.full_inter) if part == "down" else (self.full_inter, h)
        if tuple(tensor.shape) != want:
            raise WeightLoadError(f"{name}: checkpoint shape {tuple(tensor.shape)} != expected {want}")
        if part == "down":
            dst, src = self.w2[local], self._tp_slice(tensor, 1)
        else:
            dst = self.w13[local].narrow(0, 0 if part == "gate" else self.inter, self.inter)
            src = self._tp_slice(tensor, 0)
        with torch.no_grad():
            dst.copy_(src.to(dst.dtype))
        return True

    def load_stacked(self, name: str, tensor: torch.Tensor, part: str) -> None:
        """transformers >= 5 keeps all experts in one tensor (``gate_up_proj [E, 2I, H]``, ``down_proj``)."""
        h = self.w2.shape[1]
        e, i = self.num_experts, self.full_inter
        want = (e, 2 * i, h) if part == "gate_up" else (e, h, i)
        if tuple(tensor.shape) != want:
            raise WeightLoadError(f"{name}: checkpoint shape {tuple(tensor.shape)} != expected {want}")
        mine = tensor.narrow(0, self.first, self.num_local)
        if part == "down":
            src = self._tp_slice(mine, 2)
        else:
            gate, up = mine.narrow(1, 0, self.full_inter), mine.narrow(1, self.full_inter, self.full_inter)
            src = torch.cat([self._tp_slice(gate, 1).to(self.w13.dtype), self._tp_slice(up, 1).to(self.w13.dtype)], 1)
        dst = self.w13 if part == "gate_up" else self.w2
        with torch.no_grad():
            dst.copy_(src.to(dst.dtype))
