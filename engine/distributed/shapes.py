"""Can a model be split this way? Checked once, before any process starts, naming the field.

The layers would fail too, but inside a rank, after the group has formed and other ranks wait:
here a bad ``tp``/``pp``/``ep`` is one clear error at config load.
"""

from __future__ import annotations

from engine.config import ModelConfig
from engine.errors import SplitserveError


class GroupShapeError(SplitserveError, ValueError):
    """The model cannot be split over the requested tp/pp/ep group."""


def check_group_shape(
    model: ModelConfig, tp: int, pp: int, ep: int = 1, fields: tuple[str, str, str] = ("tp", "pp", "ep")
) -> None:
    """Raise `GroupShapeError` naming the field (``fields`` = the caller's names for tp, pp, ep)."""
    f_tp, f_pp, f_ep = fields
    for name, value in ((f_tp, tp), (f_pp, pp), (f_ep, ep)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise GroupShapeError(f"{name}: must be a positive integer, got {value!r}")
    if model.num_heads % tp:
        raise GroupShapeError(f"{f_tp} = {tp} does not divide the model's {model.num_heads} attention heads")
    kv = model.num_kv_heads
    if (tp <= kv and kv % tp) or (tp > kv and tp % kv):
        raise GroupShapeError(
            f"{f_tp} = {tp} must divide the model's {kv} KV heads or be a multiple of them (heads are replicated)"
        )
    if model.intermediate_size % tp:
        raise GroupShapeError(f"{f_tp} = {tp} does not divide the MLP's intermediate size {model.intermediate_size}")
    if pp > model.num_layers:
        raise GroupShapeError(f"{f_pp} = {pp} stages exceed the model's {model.num_layers} layers")
    moe = model.moe
    if ep not in (1, tp):
        raise GroupShapeError(f"{f_ep} = {ep} must be 1 or equal {f_tp} ({tp}): experts split over the tensor ranks")
    if moe is None:
        return
    if moe.num_experts % ep:
        raise GroupShapeError(f"{f_ep} = {ep} does not divide the model's {moe.num_experts} experts")
    if ep == 1 and moe.intermediate_size % tp:
        raise GroupShapeError(
            f"{f_tp} = {tp} does not divide the experts' intermediate size {moe.intermediate_size} "
            f"(or set {f_ep} = {tp})"
        )
    if moe.shared_expert_intermediate_size % tp:
        raise GroupShapeError(
            f"{f_tp} = {tp} does not divide the shared expert's size {moe.shared_expert_intermediate_size}"
        )
