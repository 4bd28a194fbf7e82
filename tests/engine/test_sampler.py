"""Sampler and SamplingParams: filters never leak, distributions match, seeded rows reproduce
regardless of batch, order and process, logprobs come from the raw logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.errors import InvalidRequestError
from engine.sampler import TOP_P_WINDOW, Sampler, SamplingBatch, apply_penalties, apply_top_k_top_p
from engine.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[2]


def _batch(
    params: list[SamplingParams],
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    eos: tuple[int, ...] = (),
) -> SamplingBatch:
    n = len(params)
    return SamplingBatch.build(params, prompts or [[0]] * n, outputs or [[]] * n, eos_token_ids=eos)


def _logits(b: int, v: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


# ---- greedy and filters ---------------------------------------------------------------------


def test_greedy_is_argmax_and_input_is_not_modified() -> None:
    logits = _logits(8, 50)
    before = logits.clone()
    out = Sampler(seed=0)(logits, _batch([SamplingParams(temperature=0.0)] * 8))
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert torch.equal(logits, before)


def test_top_k_1_is_greedy() -> None:
    logits = _logits(64, 50, seed=1)
    out = Sampler(seed=0)(logits, _batch([SamplingParams(temperature=1.5, top_k=1)] * 64))
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_top_p_below_float32_resolution_keeps_the_top_token() -> None:
    """top_p=1e-300 rounds to 0.0 in float32; it must mean "the top token", not crash the batch
    (found by fuzzing the served API: one such request failed every stream on its worker)."""
    logits = _logits(4, 50, seed=2)
    params = [SamplingParams(temperature=1.0, top_p=1e-300, seed=i) for i in range(4)]
    out = Sampler(seed=0)(logits, _batch(params))
    assert torch.equal(out.token_ids, logits.argmax(-1))


PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
FILTER_CASES = [
    (SamplingParams(top_k=3), {0, 1, 2}),
    (SamplingParams(top_p=0.6), {0, 1}),  # mass before token 2 is 0.65 >= 0.6
    (SamplingParams(min_p=0.3), {0, 1, 2}),  # keep p >= 0.3 * 0.4 = 0.12
    # top_p applies to the top-k renormalised distribution: [.44, .28, .17, .11] -> {0, 1}
    (SamplingParams(top_k=4, top_p=0.7), {0, 1}),
    (SamplingParams(min_p=0.2, top_k=5, top_p=0.95), {0, 1, 2, 3}),
    (SamplingParams(top_k=-1, top_p=1.0), set(range(6))),
]


@pytest.mark.parametrize("seeded", [False, True])
def test_filters_never_sample_masked_tokens(seeded: bool) -> None:
    rows = 600 if seeded else 3000
    params: list[SamplingParams] = []
    for i in range(rows):
        p, _ = FILTER_CASES[i % len(FILTER_CASES)]
        params.append(SamplingParams(**{**p.to_dict(), "seed": i}) if seeded else p)
    # shuffle the token order per row so "the first k ids" can't pass by accident
    perm = torch.stack([torch.randperm(6, generator=torch.Generator().manual_seed(i)) for i in range(rows)])
    logits = torch.empty(rows, 6).scatter_(1, perm, PROBS.log().expand(rows, 6))
    out = Sampler(seed=0)(logits, _batch(params))
    chosen_rank = (perm == out.token_ids[:, None]).int().argmax(1)  # position in PROBS order
    for c, (_, allowed) in enumerate(FILTER_CASES):
        seen = set(chosen_rank[c :: len(FILTER_CASES)].tolist())
        assert seen <= allowed, f"case {c} sampled a masked token: {seen - allowed}"
        assert seen == allowed, f"case {c} over-filtered: never sampled {allowed - seen}"


def _reference_top_k_top_p(x: torch.Tensor, k: list[int], p: list[float]) -> torch.Tensor:
    """Row by row, full sort, the textbook definition: the kept set as a bool mask."""
    keep = torch.ones_like(x, dtype=torch.bool)
    for i, row in enumerate(x):
        s = row.sort(descending=True).values
        if 0 < k[i] < len(row):
            row = row.masked_fill(row < s[k[i] - 1], float("-inf"))
            s = row.sort(descending=True).values
        probs = torch.softmax(s, -1)
        before = torch.cumsum(probs, -1) - probs
        n = int((before < p[i]).sum()) if p[i] < 1 else len(row)
        keep[i] = row >= s[n - 1]
    return keep


def test_top_p_window_and_full_sort_paths_match_the_definition() -> None:
    v = 3 * TOP_P_WINDOW
    scales = [0.05, 0.05, 1.0, 5.0, 5.0, 1.0]  # flat rows cut beyond the window: full sort
    ks = [0, 2000, 0, 50, 0, 0]
    ps = [0.9, 0.95, 0.5, 0.9, 0.99, 1.0]
    x = torch.stack(
        [torch.randn(v, generator=torch.Generator().manual_seed(i)) * sc for i, sc in enumerate(scales)]
    )
    got = apply_top_k_top_p(x, torch.tensor(ks), torch.tensor(ps)) > float("-inf")
    want = _reference_top_k_top_p(x, ks, ps)
    assert torch.equal(got, want)
    assert int(got[0].sum()) > TOP_P_WINDOW  # the flat row really needed the fallback


def test_ties_at_the_boundary_are_kept_together() -> None:
    for seed in range(5):
        perm = torch.randperm(5, generator=torch.Generator().manual_seed(seed))
        x = torch.tensor([2.0, 2.0, 2.0, 1.0, 0.0])[perm][None]
        kept = apply_top_k_top_p(x, None, torch.tensor([0.3])) > float("-inf")
        assert set(perm[kept[0]].tolist()) == {0, 1, 2}  # each 2.0 has p = 0.29
        y = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0])[perm][None]
        kept = apply_top_k_top_p(y, torch.tensor([2]), None) > float("-inf")
        assert set(perm[kept[0]].tolist()) == {0, 1, 2, 3}


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_distribution_matches_softmax(temperature: float) -> None:
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0])
    n = 20_000
    out = Sampler(seed=1234)(base.expand(n, 6).clone(), _batch([SamplingParams(temperature=temperature)] * n))
    counts = torch.bincount(out.token_ids, minlength=6).float()
    # df = 5: P(chi2 > 25) ~ 1e-4; the seed is fixed, so this is deterministic, not flaky
    assert _chi2(counts, torch.softmax(base / temperature, -1)) < 25


def test_seeded_rows_follow_the_distribution_too() -> None:
    base = torch.tensor([1.0, 0.0, -0.5, -1.0])
    n = 4000
    params = [SamplingParams(temperature=0.8, seed=s) for s in range(n)]
    out = Sampler(seed=0)(base.expand(n, 4).clone(), _batch(params))
    counts = torch.bincount(out.token_ids, minlength=4).float()
    assert _chi2(counts, torch.softmax(base / 0.8, -1)) < 22  # df = 3, P ~ 1e-4


# ---- penalties and min_tokens ---------------------------------------------------------------


def test_penalties_match_hand_computation() -> None:
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.5, 0.0, 3.0]])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    batch = _batch([p], prompts=[[0, 0, 5]], outputs=[[1, 1, 2]])
    got = apply_penalties(logits.clone(), batch)
    expected = torch.tensor(
        [
            [
                1.0 / 2,  # prompt token, positive: divided; no presence/frequency (not in output)
                -1.0 * 2 - 0.25 * 2 - 0.5,  # output twice, negative: multiplied
                2.0 / 2 - 0.25 - 0.5,  # output once
                0.5,
                0.0,
                3.0 / 2,  # prompt token
            ]
        ]
    )
    torch.testing.assert_close(got, expected)
    # greedy rows take the argmax of the penalised logits: 5 (3.0 -> 1.0) loses to 2 (2.0)
    greedy = SamplingParams(temperature=0, repetition_penalty=3.0)
    assert Sampler()(logits, _batch([greedy], prompts=[[5]])).token_ids.tolist() == [2]
    assert Sampler()(logits, _batch([SamplingParams(temperature=0)])).token_ids.tolist() == [5]


def test_penalties_only_touch_their_rows() -> None:
    logits = _logits(3, 10)
    params = [SamplingParams(), SamplingParams(frequency_penalty=1.0), SamplingParams()]
    got = apply_penalties(logits.clone(), _batch(params, outputs=[[1, 2], [3, 3], [4]]))
    assert torch.equal(got[[0, 2]], logits[[0, 2]])
    assert got[1, 3] == logits[1, 3] - 2.0


def test_min_tokens_suppresses_eos_and_stop_ids() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0, 0.0, 8.0]]).expand(4, 6).clone()
    params = [
        SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[5]),  # 1 generated: banned
        SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[5]),  # 2 generated: free
        SamplingParams(temperature=0, min_tokens=2, ignore_eos=True, stop_token_ids=[5]),
        SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=[5], seed=0),
    ]
    out = Sampler()(logits, _batch(params, outputs=[[1], [1, 1], [], []], eos=(3,)))
    assert out.token_ids.tolist()[:3] == [2, 3, 3]
    assert out.token_ids[3] not in (3, 5)


# ---- reproducibility ------------------------------------------------------------------------


def _run(sampler: Sampler, rows: list[tuple[torch.Tensor, SamplingParams, list[int]]]) -> list[int]:
    logits = torch.stack([r[0] for r in rows])
    batch = _batch([r[1] for r in rows], prompts=[[1, 2, 3]] * len(rows), outputs=[r[2] for r in rows])
    return sampler(logits, batch).token_ids.tolist()


def test_seeded_rows_ignore_batch_composition_and_order() -> None:
    v = 64
    a = (_logits(1, v, 10)[0], SamplingParams(seed=7, temperature=0.8, top_p=0.9), [4, 5])
    b = (_logits(1, v, 11)[0], SamplingParams(seed=11, top_k=5, repetition_penalty=1.3), [])
    others = [
        (_logits(1, v, 20)[0], SamplingParams(), [1]),
        (_logits(1, v, 21)[0], SamplingParams(temperature=0), []),
        (_logits(1, v, 22)[0], SamplingParams(min_p=0.1, logprobs=3, frequency_penalty=0.5), [9, 9]),
        (_logits(1, v, 23)[0], SamplingParams(seed=99, top_k=2), [3]),
    ]
    alone_a = _run(Sampler(seed=1), [a])[0]
    alone_b = _run(Sampler(seed=2), [b])[0]
    for order_seed in range(4):
        rows = [a, b, *others]
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(order_seed)).tolist()
        rows = [rows[i] for i in perm]
        got = _run(Sampler(seed=100 + order_seed), rows)
        assert got[perm.index(0)] == alone_a
        assert got[perm.index(1)] == alone_b


def test_seeded_noise_depends_on_step_index() -> None:
    logits = torch.zeros(1, 1000)  # uniform: the token is decided by the noise alone
    p = SamplingParams(seed=5)
    toks = [_run(Sampler(), [(logits[0], p, [0] * k)])[0] for k in range(6)]
    assert len(set(toks)) > 1  # a fresh draw per generated token
    again = [_run(Sampler(), [(logits[0], p, [7] * k)])[0] for k in range(6)]
    assert toks == again  # preempted and recomputed: same k, same token


def generate(start: int, stop: int, prefix: list[int]) -> list[int]:
    """Tokens ``start..stop-1`` of one seeded sequence over fixed per-step logits."""
    p = SamplingParams(seed=1234, temperature=0.9, top_p=0.95)
    out = list(prefix)
    for k in range(start, stop):
        logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(1000 + k)) * 2
        out.append(int(Sampler()(logits, SamplingBatch.build([p], [[1, 2, 3]], [out])).token_ids[0]))
    return out


def test_seeded_generation_is_identical_across_processes() -> None:
    """A prefill worker samples token 0 here, a decode worker continues in another process:
    the tokens equal one process generating them all."""
    here = generate(0, 8, [])
    first = generate(0, 1, [])
    code = (
        "import json, sys; from tests.engine.test_sampler import generate; "
        "print(json.dumps(generate(1, 8, json.loads(sys.argv[1]))))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, json.dumps(first)], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert json.loads(res.stdout) == here


# ---- logprobs -------------------------------------------------------------------------------


def test_logprobs_come_from_raw_logits() -> None:
    logits = _logits(4, 40, seed=3)
    params = [
        SamplingParams(temperature=0.5, repetition_penalty=1.5, logprobs=5),
        SamplingParams(temperature=0, presence_penalty=1.0, logprobs=0),
        SamplingParams(top_k=3, logprobs=2, seed=1),
        SamplingParams(),  # no logprobs asked: still gets the chosen one
    ]
    out = Sampler(seed=0)(logits, _batch(params, outputs=[[1, 2], [3], [], [4]]))
    ref = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_ids is not None and out.top_logprobs is not None
    assert out.top_ids.shape == (4, 5)
    top = ref.topk(5, -1)
    assert torch.equal(out.top_ids, top.indices)
    torch.testing.assert_close(out.top_logprobs, top.values)


def test_no_top_logprobs_when_none_asked() -> None:
    out = Sampler()(_logits(2, 10), _batch([SamplingParams()] * 2))
    assert out.top_ids is None and out.top_logprobs is None
    assert out.logprobs.shape == (2,)


# ---- SamplingParams -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 1.2),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("logprobs", 21),
        ("logprobs", -1),
        ("seed", 2**64),
        ("seed", "7"),
        ("stop", [""]),
        ("stop", 5),
        ("stop_token_ids", [-1]),
        ("ignore_eos", "yes"),
        ("n", True),
    ],
)
def test_sampling_params_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidRequestError, match=rf"^{field}:"):
        SamplingParams(**{field: value})


def test_sampling_params_normalise_and_round_trip() -> None:
    p = SamplingParams(stop="###", stop_token_ids=[3, 4], temperature=0, top_p=1)
    assert p.stop == ("###",) and p.stop_token_ids == (3, 4)
    assert p.greedy and isinstance(p.temperature, float)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams.from_dict(p.to_dict()) == p
    assert hash(p) == hash(SamplingParams.from_dict(p.to_dict()))
    with pytest.raises(InvalidRequestError, match=r"^best_of:"):
        SamplingParams.from_dict({"best_of": 2})
    with pytest.raises(InvalidRequestError, match=r"^min_tokens:"):
        SamplingParams(min_tokens=5, max_tokens=4)
    assert SamplingParams(n=3, seed=10).for_child(2) == SamplingParams(n=1, seed=12)
