"""`protocol.wire`: every conversion round-trips exactly, and what the wire cannot carry is a
named `InvalidRequestError`, not a protobuf error deep in a send."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import InvalidRequestError
from engine.sampling_params import MAX_LOGPROBS, SamplingParams
from protocol.proto import worker_pb2 as pb
from protocol.stream import PrefillTarget, TokenChunk, TokenLogprob
from protocol.wire import (
    chunk_from_proto,
    chunk_to_proto,
    generate_request_to_proto,
    params_from_proto,
    params_to_proto,
    prefill_target_from_proto,
)

_unit = st.floats(0.0, 1.0, allow_nan=False)
_penalty = st.floats(-2.0, 2.0, allow_nan=False)


@st.composite
def sampling_params(draw: st.DrawFn) -> SamplingParams:
    max_tokens = draw(st.none() | st.integers(1, 2**31 - 1))
    return SamplingParams(
        n=draw(st.integers(1, 2**31 - 1)),
        temperature=draw(st.floats(0.0, 1e6, allow_nan=False)),
        top_p=draw(st.floats(1e-9, 1.0)),
        top_k=draw(st.integers(-1, 2**31 - 1)),
        min_p=draw(_unit),
        seed=draw(st.none() | st.integers(-(2**63), 2**63 - 1)),
        presence_penalty=draw(_penalty),
        frequency_penalty=draw(_penalty),
        repetition_penalty=draw(st.floats(1e-9, 1e6)),
        max_tokens=max_tokens,
        min_tokens=draw(st.integers(0, max_tokens if max_tokens is not None else 2**31 - 1)),
        stop=tuple(draw(st.lists(st.text(min_size=1, max_size=8), max_size=4))),
        stop_token_ids=tuple(draw(st.lists(st.integers(0, 2**31 - 1), max_size=4))),
        ignore_eos=draw(st.booleans()),
        logprobs=draw(st.none() | st.integers(0, MAX_LOGPROBS)),
        skip_special_tokens=draw(st.booleans()),
        include_stop_str_in_output=draw(st.booleans()),
    )


@settings(max_examples=200, deadline=None, database=None)
@given(sampling_params())
def test_sampling_params_round_trip_exactly(p: SamplingParams) -> None:
    wire = pb.SamplingParams.FromString(params_to_proto(p).SerializeToString())  # the bytes, as sent
    assert params_from_proto(wire) == p


@pytest.mark.parametrize("name", ["seed", "max_tokens", "logprobs"])
def test_optional_fields_keep_unset_apart_from_zero(name: str) -> None:
    zero = {"seed": 0, "max_tokens": 1, "logprobs": 0}[name]
    assert getattr(params_from_proto(params_to_proto(SamplingParams(**{name: None}))), name) is None
    assert getattr(params_from_proto(params_to_proto(SamplingParams(**{name: zero}))), name) == zero


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"top_k": 2**31}, "top_k"),
        ({"n": 2**40}, "n"),
        ({"max_tokens": 2**31}, "max_tokens"),
        ({"min_tokens": 2**31, "max_tokens": None}, "min_tokens"),
        ({"stop_token_ids": (1, 2**31)}, "stop_token_ids"),
    ],
)
def test_values_the_wire_cannot_carry_are_named(changes: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError, match=rf"^{field}: "):
        params_to_proto(SamplingParams(**changes))


def test_a_bad_value_from_a_peer_is_refused_by_name() -> None:
    msg = params_to_proto(SamplingParams())
    msg.top_p = 0.0  # a peer may send anything: decoding is also the worker's check
    with pytest.raises(InvalidRequestError, match=r"^top_p: "):
        params_from_proto(msg)


@pytest.mark.parametrize("prefill", [None, PrefillTarget("prefill-0", "10.0.0.2:5001")])
def test_generate_request_round_trips(prefill: PrefillTarget | None) -> None:
    p = SamplingParams(temperature=0.3, seed=7, stop=("x",), logprobs=2)
    msg = pb.GenerateRequest.FromString(
        generate_request_to_proto("r-1", [5, 6, 7], p, prefill, timeout_s=2.5).SerializeToString()
    )
    assert (msg.request_id, list(msg.prompt_token_ids), msg.timeout_s) == ("r-1", [5, 6, 7], 2.5)
    assert params_from_proto(msg.params) == p
    assert prefill_target_from_proto(msg) == prefill


def test_a_prefill_target_without_address_is_refused() -> None:
    msg = generate_request_to_proto("r", [1], SamplingParams(), PrefillTarget("p", ""))
    with pytest.raises(InvalidRequestError, match=r"^prefill\.address: "):
        prefill_target_from_proto(msg)


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]  # logprobs travel as float32


@pytest.mark.parametrize(
    "chunk",
    [
        TokenChunk([7, 8], "ab", [TokenLogprob(_f32(-0.1), {7: _f32(-0.1), 3: -2.5}), TokenLogprob(-1.0, {})],
                   None, None, 12, 4, "prefill-0", 1),
        TokenChunk([], "", [], "stop", "</s>", 12, 0, "", 0),  # the last chunk of a logprobs request
        TokenChunk([9], "c", None, "length", None, 3, 0, "", 0),
        TokenChunk([], "", None, "abort", None, 5, 0, "", 2),
    ],
)
def test_chunks_round_trip_exactly(chunk: TokenChunk) -> None:
    wire = pb.GenerateResponse.FromString(chunk_to_proto(chunk).SerializeToString())
    assert chunk_from_proto(wire, want_logprobs=chunk.logprobs is not None) == chunk
