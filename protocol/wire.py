"""Conversions between engine types and the worker API's protobuf messages.

One place for them so the decode worker, the prefill worker and their clients agree on the
wire form. `SamplingParams` crosses as a protobuf message (never pickled); its fields are
always all set by the sender, because proto3 cannot tell an unset scalar from zero.
"""

from __future__ import annotations

from engine.sampling_params import SamplingParams
from protocol.proto import worker_pb2 as pb

_OPTIONAL = ("seed", "max_tokens", "logprobs")


def params_to_proto(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        n=p.n,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        min_p=p.min_p,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty,
        min_tokens=p.min_tokens,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        skip_special_tokens=p.skip_special_tokens,
        include_stop_str_in_output=p.include_stop_str_in_output,
    )
    for name in _OPTIONAL:
        value = getattr(p, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Raises `InvalidRequestError` naming the field, like any other bad sampling parameter."""
    return SamplingParams(
        n=msg.n,
        temperature=msg.temperature,
        top_p=msg.top_p,
        top_k=msg.top_k,
        min_p=msg.min_p,
        seed=msg.seed if msg.HasField("seed") else None,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        repetition_penalty=msg.repetition_penalty,
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else None,
        min_tokens=msg.min_tokens,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        skip_special_tokens=msg.skip_special_tokens,
        include_stop_str_in_output=msg.include_stop_str_in_output,
    )
