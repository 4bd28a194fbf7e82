"""`SamplingState`: each batch row's sampling parameters, kept on the device across steps.

`SamplingBatch.build` turns every row's params and its prompt and output token lists into
tensors: host work that grows with the context, every step. Here a row's parameters are
written once, when a sequence takes the row (`engine.input_batch.BatchRows`), and its penalty
counts are a ``[rows, V]`` tensor that each sampled token increments on the device. Per step
the host only derives what depends on the step: seeded rows' generator seeds and the rows
still under ``min_tokens``. The batch it hands the `Sampler` is built from the same values as
`SamplingBatch.build`, so tokens are identical (tests compare the two for every option).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np
import torch

from engine.input_batch import RowChanges
from engine.sampler import SamplingBatch, TokenRows, draw_index, step_seed
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

# columns of the packed float parameters (one host->device copy per composition change)
_TEMP, _TOP_P, _MIN_P, _REP, _PRES, _FREQ = range(6)


class SamplingState:
    def __init__(self, max_rows: int, vocab_size: int, eos_token_ids: Seq[int], device: torch.device) -> None:
        self.max_rows = max_rows
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = device
        self.params: list[SamplingParams | None] = [None] * max_rows
        self._f = np.zeros((6, max_rows), dtype=np.float32)
        self._top_k = np.zeros(max_rows, dtype=np.int64)
        self._greedy = np.zeros(max_rows, dtype=bool)
        self.floats = torch.zeros((6, max_rows), dtype=torch.float32, device=device)
        self.top_k = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.greedy = torch.zeros(max_rows, dtype=torch.bool, device=device)
        # penalty state, allocated when the first row with a penalty arrives
        self.counts: torch.Tensor | None = None  # [rows, V] int32: output token counts
        self.prompt_mask: torch.Tensor | None = None  # [rows, V] bool: prompt tokens (repetition rows)
        self._size = 0
        self._pen_rows: torch.Tensor | None = None  # device index of rows with any penalty
        self._top_k_max = 0
        self._top_p_rows: torch.Tensor | None = None
        self._flags: dict[str, bool] = {}
        self._suppress_cache: tuple[tuple[int, ...], TokenRows | None] = ((), None)

    # ---- composition changes -------------------------------------------------------------

    def apply(self, changes: RowChanges, seqs_by_row: Seq[Sequence]) -> None:
        """Follow `BatchRows`: move rows, write new rows' params and penalty state, upload."""
        if not changes.changed and changes.size == self._size:
            return
        if changes.moves:
            src = [s for s, _ in changes.moves]
            dst = [d for _, d in changes.moves]
            self._f[:, dst] = self._f[:, src]
            self._top_k[dst] = self._top_k[src]
            self._greedy[dst] = self._greedy[src]
            for s, d in changes.moves:
                self.params[d] = self.params[s]
            if self.counts is not None and self.prompt_mask is not None:
                si = torch.tensor(src, device=self.device)
                di = torch.tensor(dst, device=self.device)
                self.counts[di] = self.counts[si]
                self.prompt_mask[di] = self.prompt_mask[si]
        for row, _ in changes.added:
            self._write_row(row, seqs_by_row[row])
        self._size = changes.size
        for r in range(changes.size, self.max_rows):
            self.params[r] = None
        self._upload()

    def _write_row(self, row: int, seq: Sequence) -> None:
        p = seq.params
        self.params[row] = p
        self._greedy[row] = p.greedy
        self._f[:, row] = (1.0 if p.greedy else p.temperature, p.top_p, p.min_p,
                           p.repetition_penalty, p.presence_penalty, p.frequency_penalty)  # fmt: skip
        self._top_k[row] = max(p.top_k, 0)
        has_pen = _has_penalty(p)
        if has_pen and self.counts is None:
            self.counts = torch.zeros((self.max_rows, self.vocab_size), dtype=torch.int32, device=self.device)
            self.prompt_mask = torch.zeros((self.max_rows, self.vocab_size), dtype=torch.bool, device=self.device)
        if self.counts is None or self.prompt_mask is None:
            return
        self.counts[row].zero_()
        self.prompt_mask[row].zero_()
        if not has_pen:
            return
        if seq.output_token_ids:  # a sequence that joins with tokens: counted once, here
            out = torch.tensor(seq.output_token_ids, dtype=torch.int64, device=self.device)
            self.counts[row] = torch.bincount(out, minlength=self.vocab_size).to(torch.int32)
        if p.repetition_penalty != 1.0:
            prompt = torch.tensor(seq.prompt_token_ids, dtype=torch.int64, device=self.device)
            self.prompt_mask[row, prompt] = True

    def _upload(self) -> None:
        n = self._size
        self.floats[:, :n].copy_(torch.from_numpy(self._f[:, :n]), non_blocking=False)
        self.top_k[:n].copy_(torch.from_numpy(self._top_k[:n]))
        self.greedy[:n].copy_(torch.from_numpy(self._greedy[:n]))
        f = self._f[:, :n]
        self._flags = {
            "top_k": bool((self._top_k[:n] != 0).any()),
            "top_p": bool((f[_TOP_P] != 1.0).any()),
            "min_p": bool((f[_MIN_P] != 0.0).any()),
            "rep": bool((f[_REP] != 1.0).any()),
            "pres": bool((f[_PRES] != 0.0).any()),
            "freq": bool((f[_FREQ] != 0.0).any()),
        }
        on = [int(k) for k in self._top_k[:n] if 0 < k < self.vocab_size]
        self._top_k_max = max(on) if on else 0  # inactive rows count as 1: no larger than an active k
        p_rows = [r for r in range(n) if f[_TOP_P, r] < 1.0]
        self._top_p_rows = torch.tensor(p_rows, dtype=torch.int64, device=self.device)
        pen = [r for r in range(n) if _has_penalty(self.params[r])]  # type: ignore[arg-type]
        self._pen_rows = torch.tensor(pen, dtype=torch.int64, device=self.device) if pen else None
        self._suppress_cache = ((), None)

    # ---- per step ------------------------------------------------------------------------

    def batch(self, seqs: Seq[Sequence]) -> SamplingBatch:
        """The `SamplingBatch` of rows ``0..len(seqs)-1`` (``seqs[r]`` in row ``r``)."""
        n = len(seqs)
        if n != self._size:
            raise ValueError(f"SamplingState: {n} sequences for {self._size} rows")
        params = self.params[:n]
        greedy = tuple(bool(g) for g in self._greedy[:n])
        seeds = tuple(
            None if g or p is None or p.seed is None else step_seed(p.seed, draw_index(p, len(s.output_token_ids)))
            for p, g, s in zip(params, greedy, seqs)
        )
        fl, f = self._flags, self.floats
        return SamplingBatch(
            temperature=f[_TEMP, :n],
            greedy=self.greedy[:n],
            greedy_rows=greedy,
            step_seeds=seeds,
            top_k=self.top_k[:n] if fl["top_k"] else None,
            top_p=f[_TOP_P, :n] if fl["top_p"] else None,
            min_p=f[_MIN_P, :n] if fl["min_p"] else None,
            repetition=f[_REP, :n] if fl["rep"] else None,
            presence=f[_PRES, :n] if fl["pres"] else None,
            frequency=f[_FREQ, :n] if fl["freq"] else None,
            prompt_tokens=None,
            output_tokens=None,
            suppress=self._suppress(seqs),
            max_num_logprobs=max((p.logprobs or 0 for p in params if p is not None), default=0),
            output_counts=self.counts[:n] if self._pen_rows is not None and self.counts is not None else None,
            prompt_mask=self.prompt_mask[:n] if fl["rep"] and self.prompt_mask is not None else None,
            top_k_max=self._top_k_max,
            top_p_rows=self._top_p_rows,
        )

    def _suppress(self, seqs: Seq[Sequence]) -> TokenRows | None:
        """(row, id) pairs banned while a row is under ``min_tokens``; rebuilt only when the set
        of such rows changes."""
        rows: list[int] = []
        for r, s in enumerate(seqs):
            p = self.params[r]
            if p is not None and len(s.output_token_ids) < p.min_tokens and _banned(p, self.eos_token_ids):
                rows.append(r)
        key = tuple(rows)
        if key == self._suppress_cache[0]:
            return self._suppress_cache[1]
        ids = [sorted(_banned(self.params[r], self.eos_token_ids)) for r in rows]  # type: ignore[arg-type]
        flat = TokenRows.flatten(rows, ids, self.device)
        self._suppress_cache = (key, flat)
        return flat

    def record(self, tokens: torch.Tensor) -> None:
        """Count this step's sampled tokens into the penalty rows (on the device, no sync)."""
        if self._pen_rows is None or self.counts is None:
            return
        rows = self._pen_rows
        self.counts.index_put_((rows, tokens[rows]), torch.ones_like(rows, dtype=torch.int32), accumulate=True)


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _banned(p: SamplingParams, eos: tuple[int, ...]) -> set[int]:
    return set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos))
