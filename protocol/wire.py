"""The one conversion of each engine-side type to and from the worker API's protobuf messages.

Every process boundary crosses here exactly once each way: the router (through
`protocol.decode_client`) and the decode worker's `PrefillPeers` encode, the decode and prefill
servicers decode. `SamplingParams` crosses as a protobuf message (never pickled); its fields are
always all set by the sender, because proto3 cannot tell an unset scalar from zero, and the
three optional ones (``seed``, ``max_tokens``, ``logprobs``) use proto3 ``optional`` so that
"unset" survives the trip.

Where inputs are validated, and why only there:

- `SamplingParams` validates itself on construction: at the router (from the request body) and
  once on each worker, in `params_from_proto` (a worker trusts no peer's bytes, so the one
  decoding is also the one check). `params_to_proto` adds only what the wire cannot carry:
  int32 fields out of range are an `InvalidRequestError` naming the field, not a protobuf
  ``ValueError`` deep in a send.
- Prompt token ids are checked where they enter the system, the router (its own tokenizer
  produces them, or a client's ids are checked against the vocabulary in ``router.app``), and
  once more at each worker's trust boundary, by the engine (`LLMEngine.tokenize`: vocabulary;
  `LLMEngine.validate_prompt`: length and KV capacity), which alone knows its limits. Nothing
  here re-checks them: the conversions copy the ids once into and once out of the message.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from protocol.proto import worker_pb2 as pb
from protocol.stream import PrefillTarget, TokenChunk, TokenLogprob

_OPTIONAL = ("seed", "max_tokens", "logprobs")
_INT32 = ("n", "top_k", "max_tokens", "min_tokens", "logprobs", "resumed_output_tokens")  # int32 on the wire
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _check_int32(p: SamplingParams) -> None:
    for name in _INT32:
        value = getattr(p, name)
        if value is not None and not _INT32_MIN <= value <= _INT32_MAX:
            raise InvalidRequestError(f"{name}: must fit in 32 bits, got {value}")
    if any(t > _INT32_MAX for t in p.stop_token_ids):
        raise InvalidRequestError(f"stop_token_ids: every id must fit in 32 bits, got {max(p.stop_token_ids)}")


def params_to_proto(p: SamplingParams) -> pb.SamplingParams:
    """Raises `InvalidRequestError` naming the field when a value does not fit the wire."""
    _check_int32(p)
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
        stop=p.stop,
        stop_token_ids=p.stop_token_ids,
        ignore_eos=p.ignore_eos,
        skip_special_tokens=p.skip_special_tokens,
        include_stop_str_in_output=p.include_stop_str_in_output,
        resumed_output_tokens=p.resumed_output_tokens,
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
        resumed_output_tokens=msg.resumed_output_tokens,
    )


def prefill_target_from_proto(msg: pb.GenerateRequest) -> PrefillTarget | None:
    """None when the request names no prefill worker (decode runs the prompt itself)."""
    if not msg.HasField("prefill"):
        return None
    if not msg.prefill.address:
        raise InvalidRequestError("prefill.address: must not be empty")
    return PrefillTarget(msg.prefill.worker_id, msg.prefill.address)


def generate_request_to_proto(
    request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
    prefill: PrefillTarget | None = None, timeout_s: float = 0.0,
) -> pb.GenerateRequest:
    """``timeout_s``: the worker's own deadline for the request (0: the worker's default)."""
    msg = pb.GenerateRequest(
        request_id=request_id, prompt_token_ids=prompt_token_ids, params=params_to_proto(params),
        timeout_s=timeout_s,
    )
    if prefill is not None:
        msg.prefill.worker_id = prefill.worker_id
        msg.prefill.address = prefill.address
    return msg


def chunk_to_proto(ev: TokenChunk) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(
        index=ev.index, token_ids=ev.token_ids, text=ev.text, finish_reason=ev.finish_reason or "",
        stop_reason=ev.stop_reason or "", prompt_tokens=ev.prompt_tokens, cached_tokens=ev.cached_tokens,
        prefill_worker=ev.prefill_worker,
    )
    for lp in ev.logprobs or ():
        msg.logprobs.add(logprob=lp.logprob, top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top.items()])
    return msg


def chunk_from_proto(msg: pb.GenerateResponse, want_logprobs: bool) -> TokenChunk:
    """``want_logprobs``: whether the request asked for them (the wire cannot tell none from [])."""
    lps = None
    if want_logprobs:
        lps = [TokenLogprob(lp.logprob, {t.token_id: t.logprob for t in lp.top}) for lp in msg.logprobs]
    return TokenChunk(
        list(msg.token_ids), msg.text, lps, msg.finish_reason or None, msg.stop_reason or None,
        msg.prompt_tokens, msg.cached_tokens, msg.prefill_worker, msg.index,
    )
