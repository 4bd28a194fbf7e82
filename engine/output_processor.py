"""Turns sampled tokens into text and decides when each sequence stops.

Token-level stops (EOS, stop token ids, max_tokens, max_model_len) and stop strings are all
decided here, once, so the offline engine and the decode worker finish sequences identically.
While a sequence runs, the last ``max_stop_len - 1`` characters are held back from the stream:
they might be the start of a stop string that must not reach the client.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.tokenizer import Tokenizer


@dataclass
class _SeqText:
    detok: IncrementalDetokenizer | None
    text: str = ""
    sent: int = 0  # characters of text already streamed
    tokens_sent: int = 0


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    texts: list[_SeqText] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, eos_token_ids: tuple[int, ...], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.requests: dict[str, RequestState] = {}

    def add(self, state: RequestState) -> None:
        for seq in state.seqs:
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(
                    self.tokenizer, seq.prompt_token_ids, skip_special_tokens=state.params.skip_special_tokens
                )
            state.texts.append(_SeqText(detok))
        self.requests[state.request_id] = state

    def check_stop(self, seq: Sequence, st: _SeqText) -> tuple[str, str | int | None] | None:
        """Append the newest token's text; return ``(finish_reason, stop_reason)`` when it stops."""
        p = seq.params
        tok = seq.output_token_ids[-1]
        n_out = len(seq.output_token_ids)
        stop_id = n_out > p.min_tokens and (
            (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids
        )
        if st.detok is not None and not (stop_id and tok in self.eos_token_ids):
            st.text += st.detok.add(tok)
        if stop_id:
            return "stop", (None if tok in self.eos_token_ids and tok not in p.stop_token_ids else tok)
        if p.stop and n_out > p.min_tokens:
            hit = self._find_stop(st.text, p)
            if hit is not None:
                idx, s = hit
                st.text = st.text[: idx + len(s)] if p.include_stop_str_in_output else st.text[:idx]
                return "stop", s
        if p.max_tokens is not None and n_out >= p.max_tokens:
            return "length", None
        if seq.num_tokens >= self.max_model_len:
            return "length", None
        return None

    @staticmethod
    def _find_stop(text: str, p: SamplingParams) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for s in p.stop:
            idx = text.find(s)
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, s)
        return best

    def make_output(self, state: RequestState, finished_now: dict[str, tuple[str, str | int | None]]) -> RequestOutput:
        outs: list[CompletionOutput] = []
        hold = max((len(s) for s in state.params.stop), default=1) - 1
        for i, (seq, st) in enumerate(zip(state.seqs, state.texts)):
            done = seq.is_finished or seq.seq_id in finished_now
            visible = len(st.text) if done else max(st.sent, len(st.text) - hold)
            delta = st.text[st.sent : visible]
            st.sent = visible
            new_ids = seq.output_token_ids[st.tokens_sent :]
            st.tokens_sent = len(seq.output_token_ids)
            reason = finished_now.get(seq.seq_id, (seq.finish_reason, None))
            outs.append(
                CompletionOutput(
                    index=i,
                    text=st.text[:visible],
                    token_ids=list(seq.output_token_ids),
                    finish_reason=reason[0] if done else None,
                    stop_reason=reason[1] if done else None,
                    logprobs=list(seq.logprobs) if state.params.logprobs is not None else None,
                    top_logprobs=list(seq.top_logprobs) if state.params.logprobs is not None else None,
                    delta_text=delta,
                    delta_token_ids=new_ids,
                )
            )
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=outs,
            num_cached_tokens=max((s.num_cached_tokens for s in state.seqs), default=0),
        )
