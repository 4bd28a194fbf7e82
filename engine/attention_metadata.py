"""What one forward pass tells the attention function about its varlen, paged batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Tensors describing a flattened batch of ``B`` sequences and ``T`` new tokens.

    Sequence ``b`` contributes ``q_len[b] = query_start_loc[b+1] - query_start_loc[b]`` new
    tokens at positions ``seq_lens[b] - q_len[b] .. seq_lens[b] - 1``; its KV (cached prefix
    plus the new tokens, which are written first) lives in blocks ``block_tables[b, :]``.
    """

    query_start_loc: torch.Tensor  # [B+1] int32, cumulative new-token counts
    seq_lens: torch.Tensor  # [B] int32, context length after this step (prefix + new)
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64, block_id * block_size + offset of each new token
    positions: torch.Tensor  # [T] int64
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1
