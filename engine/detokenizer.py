"""Streaming token ids to text without ever emitting half a character.

Byte-level BPE splits multi-byte UTF-8 characters (emoji, CJK) across tokens, and SentencePiece
decoders drop or add a leading space depending on what precedes a token. Decoding each token alone
gets both wrong. As vLLM does, we decode a short window twice -- ``ids[prefix:read]`` (already
emitted) and ``ids[prefix:]`` -- and emit the difference, holding it back while it ends in U+FFFD
(an incomplete character). The window keeps the cost per token constant.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.tokenizer import Tokenizer

# Prompt tokens kept as left context so the first generated token decodes with its real neighbour.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:]) if prompt_ids else []
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = len(self.ids)  # ids before this are already in `text`
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one generated token; returns only the text it completes (may be empty)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT):
            # nothing new yet (a skipped special token) or a character still incomplete: wait
            return ""
        new = full_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += new
        return new

    def flush(self) -> str:
        """At the end of a sequence: whatever was held back, even if it is not valid UTF-8."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        new = full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += new
        return new

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""
