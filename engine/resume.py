"""Resuming a request that another worker began: the engine side of migration by token replay.

When a decode worker dies mid-stream the router re-submits the request elsewhere with the
prompt followed by every token already streamed, and ``SamplingParams.resumed_output_tokens``
saying how many of those ids are output. Treating them as output (not prompt) is what makes
the continuation identical to an uninterrupted run: the seeded sampler draws the noise of
position ``len(output)``, min/max_tokens and the presence/frequency penalties count them, and
the detokenizer and the stop-string hold-back replay them so the text already sent is not
sent again and a stop string spanning the cut is still found.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

from engine.errors import InvalidRequestError
from engine.output_processor import RequestState
from engine.sampling_params import SamplingParams


def split_resumed(ids: Seq[int], params: SamplingParams) -> tuple[list[int], list[int]]:
    """(prompt, output already generated) of a request's ids."""
    k = params.resumed_output_tokens
    if k == 0:
        return list(ids), []
    if k >= len(ids):
        raise InvalidRequestError(
            f"resumed_output_tokens: must be less than the {len(ids)} prompt ids it counts from the end, got {k}"
        )
    if params.n != 1:
        raise InvalidRequestError("resumed_output_tokens: a resumed request has one sequence (n=1)")
    if params.max_tokens is not None and k >= params.max_tokens:
        raise InvalidRequestError(f"resumed_output_tokens: {k} already reach max_tokens ({params.max_tokens})")
    return list(ids[:-k]), list(ids[-k:])


def replay_resumed_text(state: RequestState) -> None:
    """Bring each sequence's text state to where the first worker left it: its detokenizer has
    seen every resumed token, and the text it streamed (all but the stop-string hold-back,
    which depends only on the text) counts as sent, as do the resumed token ids."""
    hold = max((len(s) for s in state.params.stop), default=1) - 1
    for seq, st in zip(state.seqs, state.texts):
        if st.detok is not None:
            for tok in seq.output_token_ids:
                st.text += st.detok.add(tok)
        st.sent = max(0, len(st.text) - hold)
        st.tokens_sent = len(seq.output_token_ids)
