"""Persistent decode inputs: rows that outlive a step, updated in place.

Rebuilding token ids, positions, slots and block tables from Python lists every step costs host
time that grows with the batch's context, and a CUDA graph needs its inputs at fixed addresses.
So a sequence keeps its *row* while it samples step after step; when one leaves, the last row
moves into its hole (vLLM's condense), which keeps rows ``0..B-1`` dense. Per step the host
writes one token, one position and at most one new block id per row, then issues one copy for
the small per-row fields and one for the block table (only when a row gained a block).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.attention_metadata import AttentionMetadata
from engine.sequence import Sequence

# rows of the packed per-row tensor (one host->device copy for all of them)
_IDS, _POS, _SLOT, _LEN, _SRC = range(5)
# an output token sampled on the device whose value the host has not read yet (overlap,
# `engine.async_step`): the row's input id is taken from the previous step's device tokens
PLACEHOLDER_TOKEN = -1


@dataclass
class RowChanges:
    """How the rows changed this step: row moves ``(src, dst)`` (sources and destinations are
    disjoint, so they can be applied at once), new sequences ``(row, seq_id)``, the new size."""

    moves: list[tuple[int, int]] = field(default_factory=list)
    added: list[tuple[int, str]] = field(default_factory=list)
    size: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.moves or self.added)


class BatchRows:
    """Which sequence sits in which row; rows stay dense (``0..size-1``)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def update(self, seq_ids: Seq[str]) -> RowChanges:
        """Make the rows hold exactly ``seq_ids``; unchanged sequences keep their rows when they
        can (a leaver's hole is filled from the end)."""
        wanted = set(seq_ids)
        if len(wanted) != len(seq_ids):
            raise ValueError("BatchRows: duplicate sequence ids in one step")
        if len(wanted) == len(self.ids) and all(i in wanted for i in self.ids):
            return RowChanges(size=len(self.ids))
        ids: list[str | None] = list(self.ids)
        holes = [r for r, i in enumerate(self.ids) if i not in wanted]
        for r in holes:
            ids[r] = None
        moves: list[tuple[int, int]] = []
        hi = len(ids) - 1
        for h in holes:
            while hi >= 0 and ids[hi] is None:
                hi -= 1
            if hi <= h:
                break
            ids[h], ids[hi] = ids[hi], None
            moves.append((hi, h))
        while ids and ids[-1] is None:
            ids.pop()
        kept: list[str] = [i for i in ids if i is not None]
        added = [(len(kept) + k, i) for k, i in enumerate(i for i in seq_ids if i not in self.index)]
        self.ids = kept + [i for _, i in added]
        self.index = {i: r for r, i in enumerate(self.ids)}
        return RowChanges(moves, added, len(self.ids))


def last_token(seq: Sequence) -> int:
    return seq.output_token_ids[-1] if seq.output_token_ids else seq.prompt_token_ids[-1]


class DecodeInputs:
    """Device buffers of a decode batch (one new token per row), padded to ``padded`` rows.

    Padded rows get token 0 at position 0, slot -1 (the KV write skips it) and length 0 (the
    attention reads nothing and writes zeros), so they cost compute but never touch real KV.
    """

    def __init__(self, max_rows: int, max_blocks: int, block_size: int, device: torch.device) -> None:
        self.max_rows = max_rows
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.device = device
        pin = device.type == "cuda"
        self._host_small = torch.zeros((5, max_rows), dtype=torch.int64, pin_memory=pin)
        self._host_bt = torch.zeros((max_rows, max_blocks), dtype=torch.int32, pin_memory=pin)
        self._small = self._host_small.numpy()
        self._bt = self._host_bt.numpy()
        self._nblk = np.zeros(max_rows, dtype=np.int64)  # block ids of each row already in _bt
        self._moved = False  # host rows moved since the last copy: the device table is stale
        self.small = torch.zeros((5, max_rows), dtype=torch.int64, device=device)
        self.block_tables = torch.zeros((max_rows, max_blocks), dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_rows + 1, dtype=torch.int32, device=device)
        self._copied = torch.cuda.Event() if device.type == "cuda" else None

    @property
    def capacity_tokens(self) -> int:
        return self.max_blocks * self.block_size

    def apply(self, changes: RowChanges) -> None:
        """Move host rows as `BatchRows` moved sequences; new rows start empty."""
        if changes.moves:
            src = np.array([s for s, _ in changes.moves])
            dst = np.array([d for _, d in changes.moves])
            self._bt[dst] = self._bt[src]
            self._nblk[dst] = self._nblk[src]
            self._moved = True
        for row, _ in changes.added:
            self._nblk[row] = 0

    def prepare(
        self, seqs: Seq[Sequence], tables: Seq[Seq[int]], padded: int,
        pending: Seq[tuple[int, int]] = (), prev_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, AttentionMetadata]:  # fmt: skip
        """Write this step's rows (``seqs[r]`` in row ``r``) and copy them to the device.

        ``pending`` lists ``(row, src)`` for rows whose last token is still on the device:
        their input id is ``prev_tokens[src]`` (the previous step's sampled tokens), gathered
        on the device, so the host never waits for them."""
        b = len(seqs)
        if not b <= padded <= self.max_rows:
            raise ValueError(f"DecodeInputs: {b} rows padded to {padded}, capacity {self.max_rows}")
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copies have read the host buffers
        bt_dirty = self._sync_block_tables(tables) or self._moved
        self._moved = False
        small = self._small
        pos = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=b)
        small[_IDS, :b] = np.fromiter((last_token(s) for s in seqs), dtype=np.int64, count=b)
        small[_POS, :b] = pos
        small[_LEN, :b] = pos + 1
        bs = self.block_size
        small[_SLOT, :b] = self._bt[np.arange(b), pos // bs].astype(np.int64) * bs + pos % bs
        small[_SRC, :padded] = -1
        for row, src in pending:
            small[_SRC, row] = src
        small[_IDS, b:padded] = 0
        small[_POS, b:padded] = 0
        small[_LEN, b:padded] = 0
        small[_SLOT, b:padded] = -1
        self.small.copy_(self._host_small, non_blocking=True)
        if bt_dirty:
            self.block_tables[:b].copy_(self._host_bt[:b], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        if pending:
            if prev_tokens is None:
                raise ValueError("DecodeInputs: pending rows need the previous step's tokens")
            src_t, ids = self.small[_SRC, :b], self.small[_IDS, :b]
            ids.copy_(torch.where(src_t >= 0, prev_tokens[src_t.clamp(min=0)], ids))
        longest = int(pos.max()) + 1 if b else 1
        return self.small[_IDS, :padded], self.metadata(padded, longest)

    def prepare_dummy(self, padded: int) -> tuple[torch.Tensor, AttentionMetadata]:
        """All rows padding: what a CUDA graph is captured on (writes no KV)."""
        self.small[_IDS, :padded] = 0
        self.small[_POS, :padded] = 0
        self.small[_LEN, :padded] = 0
        self.small[_SLOT, :padded] = -1
        return self.small[_IDS, :padded], self.metadata(padded, self.capacity_tokens)

    def metadata(self, padded: int, max_seq_len: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: padded + 1],
            seq_lens=self.small[_LEN, :padded],
            block_tables=self.block_tables[:padded],
            slot_mapping=self.small[_SLOT, :padded],
            positions=self.small[_POS, :padded],
            max_query_len=1,
            max_seq_len=max_seq_len,
        )

    def _sync_block_tables(self, tables: Seq[Seq[int]]) -> bool:
        """Append the block ids each row gained (at most one per row in decode); a row whose
        table no longer extends what we hold (it cannot, but cheap to check) is rewritten."""
        dirty = False
        bt, nblk = self._bt, self._nblk
        for r, t in enumerate(tables):
            n, m = int(nblk[r]), len(t)
            if m == n and (n == 0 or bt[r, n - 1] == t[n - 1]):
                continue
            if m > self.max_blocks:
                raise ValueError(f"DecodeInputs: a table of {m} blocks exceeds max_blocks={self.max_blocks}")
            if m < n or (n and bt[r, n - 1] != t[n - 1]):
                n = 0
            bt[r, n:m] = t[n:m]
            nblk[r] = m
            dirty = True
        return dirty
