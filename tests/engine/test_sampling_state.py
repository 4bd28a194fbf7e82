"""`SamplingState` (parameters and penalty counts kept on the device across steps) samples the
same tokens, logprobs and top-N as `SamplingBatch.build` (rebuilt from token lists each step),
for every sampling option, while rows move, leave and join."""

from __future__ import annotations

import pytest
import torch

from engine.input_batch import BatchRows
from engine.sampler import Sampler, SamplingBatch
from engine.sampling_params import SamplingParams
from engine.sampling_state import SamplingState
from engine.sequence import Sequence

VOCAB = 64
EOS = (1,)

OPTIONS = {
    "greedy": SamplingParams(temperature=0),
    "random": SamplingParams(temperature=0.9),
    "seeded": SamplingParams(temperature=0.8, seed=7),
    "top_k": SamplingParams(temperature=1.0, top_k=5, seed=1),
    "top_p": SamplingParams(temperature=1.0, top_p=0.6, seed=2),
    "min_p": SamplingParams(temperature=1.0, min_p=0.1, seed=3),
    "repetition": SamplingParams(temperature=0.7, repetition_penalty=1.5, seed=4),
    "presence": SamplingParams(temperature=0, presence_penalty=1.5),
    "frequency": SamplingParams(temperature=0.6, frequency_penalty=0.8, seed=5),
    "min_tokens": SamplingParams(temperature=0, min_tokens=6, stop_token_ids=[3, 4]),
    "min_tokens_eos": SamplingParams(temperature=0.5, min_tokens=4, seed=6),
    "logprobs": SamplingParams(temperature=0.5, logprobs=3, seed=8),
    "everything": SamplingParams(
        temperature=1.1, top_k=9, top_p=0.8, min_p=0.02, repetition_penalty=0.7, presence_penalty=-0.5,
        frequency_penalty=0.3, min_tokens=3, seed=9, logprobs=2,
    ),
}


def _seqs(names: list[str], start: int) -> list[Sequence]:
    out = []
    for k, name in enumerate(names):
        prompt = [(7 * k + 3 * j) % VOCAB for j in range(5 + k)]
        seq = Sequence(f"{name}-{start}-{k}", name, prompt, OPTIONS[name])
        seq.output_token_ids = [(k + j) % VOCAB for j in range(start % 3)]  # some join with tokens
        out.append(seq)
    return out


def _assert_same(a, b) -> None:
    assert torch.equal(a.token_ids, b.token_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=0)
    assert (a.top_ids is None) == (b.top_ids is None)
    if a.top_ids is not None:
        assert torch.equal(a.top_ids, b.top_ids) and torch.equal(a.top_logprobs, b.top_logprobs)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_state_matches_rebuilt_batch(option: str) -> None:
    """One option, mixed with greedy and seeded rows, over 12 steps with leavers and joiners."""
    names = [option, "greedy", option, "seeded", option]
    live = _seqs(names, 0)
    state = SamplingState(8, VOCAB, EOS, torch.device("cpu"))
    rows = BatchRows()
    ours, ref = Sampler(seed=0), Sampler(seed=0)
    gen = torch.Generator().manual_seed(0)
    for step in range(12):
        if step == 4:
            live = [live[0], live[2], live[4], *_seqs([option, "random"], step)]  # two leave, two join
        if step == 8:
            live = live[1:]
        changes = rows.update([s.seq_id for s in live])
        by_id = {s.seq_id: s for s in live}
        seqs = [by_id[i] for i in rows.ids]
        state.apply(changes, seqs)
        logits = torch.randn((len(seqs), VOCAB), generator=gen) * 3
        batch = SamplingBatch.build(
            [s.params for s in seqs], [s.prompt_token_ids for s in seqs], [s.output_token_ids for s in seqs],
            eos_token_ids=EOS,
        )
        want = ref(logits, batch)
        got = ours(logits, state.batch(seqs))
        _assert_same(got, want)
        state.record(got.token_ids)
        for s, t in zip(seqs, got.token_ids.tolist()):
            s.output_token_ids.append(t)


def test_min_tokens_suppression_lifts_after_min_tokens() -> None:
    seq = _seqs(["min_tokens"], 0)[0]
    state = SamplingState(2, VOCAB, EOS, torch.device("cpu"))
    rows = BatchRows()
    state.apply(rows.update([seq.seq_id]), [seq])
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, 3] = 5.0  # a stop id is the best token
    for _ in range(6):
        tok = int(Sampler()(logits, state.batch([seq])).token_ids[0])
        assert tok != 3
        seq.output_token_ids.append(tok)
    assert int(Sampler()(logits, state.batch([seq])).token_ids[0]) == 3


def test_batch_size_must_match_rows() -> None:
    state = SamplingState(2, VOCAB, EOS, torch.device("cpu"))
    with pytest.raises(ValueError, match="rows"):
        state.batch(_seqs(["greedy"], 0))
