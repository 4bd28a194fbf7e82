"""`Sampler`: next tokens for a batch of logits ``[B, V]``, each row with its own parameters.

Pipeline (vLLM's order)::

    raw logits ─┬─> logprobs (chosen token + top-N), from the raw log_softmax as vLLM v1 reports
                └─> penalties (repetition: prompt+output; presence/frequency: output)
                    -> min_tokens (EOS / stop ids masked)
                    -> greedy rows: argmax
                    -> random rows: / temperature -> min_p -> top_k -> top_p
                       -> argmax(probs / q), q ~ Exp(1)   (the exponential race == sampling)

Everything is a tensor op over the batch; the only Python loop is over *seeded rows*, to draw
their noise from a generator seeded by ``(seed, k)`` where ``k`` is the index of the token being
generated (``len(output_ids)``). That makes a seeded row's token a function of its own logits,
params, seed and ``k`` alone: independent of the other rows of the batch, of preemption (a
recomputed sequence has the same ``k``) and of the process (a prefill worker samples token 0,
a decode worker tokens 1..; the result equals one process doing both on the same device type).
Each filter is per row and keeps a row's result independent of the other rows: top-k and top-p
are thresholds on the logit value (ties kept together), every width a row is reduced over is
the vocabulary or a constant, and top-p only touches rows with p < 1.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import blake2b

import numpy as np
import torch

from engine.sampling_params import SamplingParams

_NEG_INF = float("-inf")


def step_seed(seed: int, k: int) -> int:
    """Generator seed of a seeded row's ``k``-th generated token: stable across processes."""
    digest = blake2b(struct.pack("<QQ", seed & 0xFFFF_FFFF_FFFF_FFFF, k), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def draw_index(params: SamplingParams, num_output_tokens: int) -> int:
    """``k`` of a seeded row's next draw: the index of the token being generated. One place,
    so that every path that samples (`SamplingBatch.build`, `engine.sampling_state`) agrees."""
    return num_output_tokens


@dataclass(frozen=True)
class TokenRows:
    rows: torch.Tensor  # [N] int64
    ids: torch.Tensor  # [N] int64

    @classmethod
    def flatten(cls, rows: list[int], seqs: Sequence[Sequence[int]], device: torch.device) -> TokenRows | None:
        """Tokens ``seqs[j]`` of batch row ``rows[j]``, flattened with their row index: no [B, L]
        padding, and rows that need no token lists (the common case) cost nothing. One
        ``np.fromiter`` over all lists is ~4x faster than a tensor per row."""
        lens = [len(s) for s in seqs]
        total = sum(lens)
        if total == 0:
            return None
        ids = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=total)
        row_idx = torch.repeat_interleave(torch.tensor(rows, dtype=torch.int64), torch.tensor(lens))
        return cls(row_idx.to(device), torch.from_numpy(ids).to(device))


_flat_rows = TokenRows.flatten


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling state as tensors; ``None`` where no row of the batch uses a feature,
    so a plain batch pays for nothing it doesn't use."""

    temperature: torch.Tensor  # [B] float32; 1.0 on greedy rows, so nothing divides by 0
    greedy: torch.Tensor  # [B] bool
    greedy_rows: tuple[bool, ...]
    step_seeds: tuple[int | None, ...]  # per row, seed of this step's noise (None: shared generator)
    top_k: torch.Tensor | None  # [B] int64, 0 = off
    top_p: torch.Tensor | None  # [B] float32
    min_p: torch.Tensor | None  # [B] float32
    repetition: torch.Tensor | None  # [B] float32
    presence: torch.Tensor | None  # [B] float32
    frequency: torch.Tensor | None  # [B] float32
    prompt_tokens: TokenRows | None  # rows with a repetition penalty
    output_tokens: TokenRows | None  # rows with any penalty
    suppress: TokenRows | None  # (row, id) pairs banned until min_tokens is reached
    max_num_logprobs: int  # largest top-N asked for; 0 when none
    # the same penalty inputs kept on the device across steps (`engine.sampling_state`): dense
    # per-row output token counts and prompt-token masks instead of the token lists above
    output_counts: torch.Tensor | None = None  # [B, V] int32
    prompt_mask: torch.Tensor | None = None  # [B, V] bool
    # known on the host: the largest active top-k (0: none) and the rows with top-p < 1
    top_k_max: int | None = None
    top_p_rows: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return len(self.greedy_rows)

    @property
    def all_greedy(self) -> bool:
        return all(self.greedy_rows)

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        eos_token_ids: Sequence[int] = (),
        device: torch.device | str = "cpu",
    ) -> SamplingBatch:
        """Rows are ``params[i]`` with the sequence's prompt and generated-so-far tokens."""
        if not len(params) == len(prompt_ids) == len(output_ids):
            raise ValueError(
                f"SamplingBatch: {len(params)} params, {len(prompt_ids)} prompts, {len(output_ids)} outputs"
            )
        dev = torch.device(device)

        def col(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=dev)

        def opt(values: list[float], off: float, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
            return col(values, dtype) if any(v != off for v in values) else None

        greedy = tuple(p.greedy for p in params)
        top_k = [max(p.top_k, 0) for p in params]
        rep = [p.repetition_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        freq = [p.frequency_penalty for p in params]
        rep_rows = [i for i, r in enumerate(rep) if r != 1.0]
        pen_rows = [i for i in range(len(params)) if rep[i] != 1.0 or pres[i] != 0.0 or freq[i] != 0.0]

        sup_rows: list[int] = []
        sup_ids: list[list[int]] = []
        for i, p in enumerate(params):
            if len(output_ids[i]) < p.min_tokens:
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
                if banned:
                    sup_rows.append(i)
                    sup_ids.append(sorted(banned))
        seeds = tuple(
            None if g or p.seed is None else step_seed(p.seed, draw_index(p, len(out)))
            for p, g, out in zip(params, greedy, output_ids)
        )
        return cls(
            temperature=col([1.0 if g else p.temperature for p, g in zip(params, greedy)]),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=dev),
            greedy_rows=greedy,
            step_seeds=seeds,
            top_k=opt(top_k, 0, torch.int64),
            top_p=opt([p.top_p for p in params], 1.0),
            min_p=opt([p.min_p for p in params], 0.0),
            repetition=col(rep) if rep_rows else None,
            presence=opt(pres, 0.0),
            frequency=opt(freq, 0.0),
            prompt_tokens=_flat_rows(rep_rows, [prompt_ids[i] for i in rep_rows], dev),
            output_tokens=_flat_rows(pen_rows, [output_ids[i] for i in pen_rows], dev),
            suppress=_flat_rows(sup_rows, sup_ids, dev),
            max_num_logprobs=max((p.logprobs or 0 for p in params), default=0),
        )


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float32, chosen token under the raw log_softmax
    top_ids: torch.Tensor | None  # [B, N] int64, N = the batch's largest `logprobs`; rows slice theirs
    top_logprobs: torch.Tensor | None  # [B, N] float32


class Sampler:
    """Stateless but for the generator of unseeded rows (one per device)."""

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}
        self._seeded: dict[torch.device, torch.Generator] = {}

    def _generator(self, pool: dict[torch.device, torch.Generator], device: torch.device) -> torch.Generator:
        g = pool.get(device)
        if g is None:
            g = torch.Generator(device=device)
            if pool is self._shared:
                if self._seed is None:
                    g.seed()
                else:
                    g.manual_seed(self._seed)
            pool[device] = g
        return g

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != batch.size:
            raise ValueError(f"logits: expected [{batch.size}, V], got {list(logits.shape)}")
        raw = logits.float()
        x = apply_penalties(raw, batch)  # out of place: raw stays for the logprobs
        if batch.suppress is not None:
            ban = torch.tensor(_NEG_INF, device=x.device)
            x = x.index_put((batch.suppress.rows, batch.suppress.ids), ban)
        tokens = x.argmax(dim=-1)
        if not batch.all_greedy:
            random_tokens = self._sample_random(x, batch)
            tokens = torch.where(batch.greedy, tokens, random_tokens)
        return compute_logprobs(raw, tokens, batch.max_num_logprobs)

    def _sample_random(self, x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        x = x / batch.temperature[:, None]
        if batch.min_p is not None:
            x = apply_min_p(x, batch.min_p)
        if batch.top_k is not None or batch.top_p is not None:
            x = apply_top_k_top_p(x, batch.top_k, batch.top_p, batch.top_k_max, batch.top_p_rows)
        probs = x.softmax(dim=-1)
        q = torch.ones_like(probs)
        shared_rows = [
            i for i, (g, s) in enumerate(zip(batch.greedy_rows, batch.step_seeds)) if not g and s is None
        ]
        if shared_rows:
            noise = torch.empty((len(shared_rows), probs.shape[1]), device=probs.device)
            noise.exponential_(generator=self._generator(self._shared, probs.device))
            q[torch.tensor(shared_rows, device=probs.device)] = noise
        seeded = self._generator(self._seeded, probs.device)
        for i, s in enumerate(batch.step_seeds):
            if s is not None:
                seeded.manual_seed(s)
                q[i].exponential_(generator=seeded)
        # Exp(1) can round to 0; 0/0 would be NaN and argmax would pick a masked token
        q.clamp_min_(torch.finfo(q.dtype).tiny)
        return probs.div_(q).argmax(dim=-1)


def apply_penalties(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """OpenAI presence/frequency (output tokens) and the CTRL repetition penalty (prompt and
    output tokens: positive logits divided, negative multiplied). Returns a new tensor."""
    if batch.output_tokens is None and batch.prompt_tokens is None and batch.output_counts is None:
        return x
    if batch.output_counts is not None:
        counts = batch.output_counts.to(x.dtype)
    else:
        counts = torch.zeros_like(x)
        if batch.output_tokens is not None:
            t = batch.output_tokens
            counts.index_put_((t.rows, t.ids), torch.ones_like(t.ids, dtype=x.dtype), accumulate=True)
    if batch.repetition is not None:
        seen = counts > 0
        if batch.prompt_mask is not None:
            seen |= batch.prompt_mask
        elif batch.prompt_tokens is not None:
            seen[batch.prompt_tokens.rows, batch.prompt_tokens.ids] = True
        r = batch.repetition[:, None].expand_as(x)
        penalised = torch.where(x > 0, x / r, x * r)
        x = torch.where(seen, penalised, x)
    if batch.frequency is not None:
        x = x - batch.frequency[:, None] * counts
    if batch.presence is not None:
        x = x - batch.presence[:, None] * (counts > 0).to(x.dtype)
    return x


def apply_min_p(x: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens with ``p < min_p * p_max``; in logit space ``x - x_max < log(min_p)``
    (min_p = 0 gives -inf: nothing dropped), which avoids a softmax."""
    threshold = x.amax(dim=-1, keepdim=True) + torch.log(min_p)[:, None]
    return x.masked_fill(x < threshold, _NEG_INF)


def apply_top_k_top_p(
    x: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
    k_max: int | None = None, p_rows: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Top-k, then top-p over the top-k renormalised distribution (vLLM's semantics).

    Both are applied as a *threshold on the logit value* (keep ``x >= t``), so tokens tied at
    the boundary are kept together and the result never depends on how a sort or top-k orders
    ties: a row's kept set is a function of that row alone. ``k_max`` (the largest active k,
    0: none) and ``p_rows`` (rows with p < 1), when the caller knows them on the host, spare
    the device->host syncs that would otherwise find them.
    """
    if top_k is not None:
        x = _apply_top_k(x, top_k, k_max)
    if top_p is None:
        return x
    rows = p_rows if p_rows is not None else (top_p < 1.0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return x
    xs = x[rows]
    xs = xs.masked_fill(xs < _top_p_threshold(xs, top_p[rows]), _NEG_INF)
    return x.index_put((rows,), xs)


def _apply_top_k(x: torch.Tensor, top_k: torch.Tensor, k_max: int | None = None) -> torch.Tensor:
    k_on = (top_k > 0) & (top_k < x.shape[-1])
    if k_max is None:
        k_max = int(torch.where(k_on, top_k, 1).max()) if bool(k_on.any()) else 0
    if k_max == 0:
        return x
    kth = x.topk(k_max, dim=-1).values.gather(1, torch.where(k_on, top_k - 1, 0)[:, None])
    return x.masked_fill(x < torch.where(k_on[:, None], kth, _NEG_INF), _NEG_INF)


# Top-p first looks for its cut-off among each row's TOP_P_WINDOW largest logits (a partial
# top-k, far cheaper than sorting a 128k vocabulary) and sorts only the rows whose cut-off
# lies beyond it (flat distributions). The width is a constant, never the batch's, so which
# path a row takes, and its float rounding, depend on that row alone.
TOP_P_WINDOW = 1024


def _top_p_threshold(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Smallest logit kept per row ``[R, 1]``: a token stays if the mass of strictly more
    likely tokens (in sorted order) is below ``top_p``; the top token always stays."""
    lse = x.logsumexp(dim=-1, keepdim=True)
    window = min(TOP_P_WINDOW, x.shape[-1])
    thresh, resolved = _cutoff(x.topk(window, dim=-1).values, lse, top_p)
    if window < x.shape[-1] and not bool(resolved.all()):
        rest = (~resolved).nonzero().squeeze(1)
        full = x[rest].sort(dim=-1, descending=True, stable=True).values
        thresh = thresh.index_put((rest,), _cutoff(full, lse[rest], top_p[rest])[0])
    return thresh


def _cutoff(
    sorted_x: torch.Tensor, lse: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    probs = (sorted_x - lse).exp()
    before = torch.zeros_like(probs)
    before[:, 1:] = probs.cumsum(dim=-1)[:, :-1]  # exclusive, hence monotone: kept is a prefix
    num_kept = (before < top_p[:, None]).sum(dim=-1, keepdim=True).clamp(min=1)
    return sorted_x.gather(1, num_kept - 1), num_kept.squeeze(1) < sorted_x.shape[-1]


def compute_logprobs(raw: torch.Tensor, tokens: torch.Tensor, num_top: int) -> SamplerOutput:
    """Logprobs under the model's own distribution (before penalties and temperature)."""
    lse = raw.logsumexp(dim=-1)
    chosen = raw.gather(1, tokens[:, None]).squeeze(1) - lse
    if num_top <= 0:
        return SamplerOutput(tokens, chosen, None, None)
    values, ids = raw.topk(min(num_top, raw.shape[-1]), dim=-1)
    return SamplerOutput(tokens, chosen, ids, values - lse[:, None])
