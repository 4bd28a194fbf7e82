"""Synthetic prompts of a requested token length, optionally in groups that share a prefix.

Lengths are what the *served* model sees, so they are measured with its tokenizer: text is built
from random vocabulary words (each one token on its own, so joined words keep their count under
space-splitting pre-tokenizers) and then grown or shrunk until the tokenizer agrees. For the chat
endpoint the count includes the chat template around the message, as the server renders it.
Random words rather than a corpus keep the workload free of downloads and of accidental prefix
reuse; the shared-prefix mode adds reuse on purpose (SGLang's "generated-shared-prefix").
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from engine.tokenizer import Tokenizer

Endpoint = Literal["completions", "chat"]
_WORD = re.compile(r"[Ġ▁]([a-z]{3,})")
_MAX_CANDIDATES = 4000
_MIN_WORDS = 64
_FIT_ROUNDS = 40


class WorkloadError(ValueError):
    """A workload that cannot be built as asked (bad length spec, prefix longer than prompts...)."""


@dataclass(frozen=True)
class LengthDist:
    """Token lengths: ``fixed`` (a), ``uniform`` over [a, b] inclusive, or ``normal`` (mean a, std b)."""

    kind: Literal["fixed", "uniform", "normal"]
    a: float
    b: float = 0.0

    def __post_init__(self) -> None:
        if self.a < 1 or (self.kind == "uniform" and self.b < self.a) or self.b < 0:
            raise WorkloadError(f"invalid {self.kind} length distribution ({self.a}, {self.b})")

    def sample(self, rng: random.Random, n: int) -> list[int]:
        if self.kind == "fixed":
            return [int(self.a)] * n
        if self.kind == "uniform":
            return [rng.randint(int(self.a), int(self.b)) for _ in range(n)]
        return [max(1, round(rng.gauss(self.a, self.b))) for _ in range(n)]

    def minimum(self) -> int:
        return 1 if self.kind == "normal" else int(self.a)

    def describe(self) -> str:
        return {"fixed": f"{self.a:g}", "uniform": f"{self.a:g}:{self.b:g}", "normal": f"N({self.a:g},{self.b:g})"}[
            self.kind
        ]


def parse_length(fixed: int | None, span: str | None, std: float | None, default: int, name: str) -> LengthDist:
    """The distribution from ``--X-len N``, ``--X-len-range A:B`` and ``--X-len-std S`` (normal around N)."""
    if span is not None:
        if fixed is not None or std is not None:
            raise WorkloadError(f"--{name}-len-range excludes --{name}-len and --{name}-len-std")
        lo, sep, hi = span.partition(":")
        try:
            a, b = int(lo), int(hi)
        except ValueError:
            raise WorkloadError(f"--{name}-len-range: expected A:B (integers), got {span!r}") from None
        if not sep or a < 1 or b < a:
            raise WorkloadError(f"--{name}-len-range: expected 1 <= A <= B, got {span!r}")
        return LengthDist("uniform", a, b)
    mean = default if fixed is None else fixed
    if mean < 1:
        raise WorkloadError(f"--{name}-len must be at least 1, got {mean}")
    if std is not None:
        if std < 0:
            raise WorkloadError(f"--{name}-len-std must be >= 0, got {std}")
        return LengthDist("normal", mean, std)
    return LengthDist("fixed", mean)


@dataclass(frozen=True)
class Prompt:
    """One request's input: the prompt text, its token length, the tokens to generate, its group."""

    text: str
    input_len: int
    output_len: int
    group: int | None = None


class PromptBuilder:
    """Builds texts of exact token lengths for one tokenizer and endpoint."""

    def __init__(self, tokenizer: Tokenizer, endpoint: Endpoint, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.endpoint = endpoint
        self.rng = random.Random(seed)
        self.words = single_token_words(tokenizer, self.rng)
        self.chat = endpoint == "chat" and tokenizer.chat_template is not None

    def count(self, text: str) -> int:
        """Prompt tokens the server will see for this text (template included for chat)."""
        if self.chat:
            rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}])
            return len(self.tokenizer.encode(rendered, add_special_tokens=False))
        return len(self.tokenizer.encode(text, add_special_tokens=self.endpoint == "completions"))

    def raw_count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def overhead(self) -> int:
        """Tokens the endpoint adds around an empty text (chat template, BOS)."""
        return self.count("")

    def text(self, target: int, prefix: str = "", count: Callable[[str], int] | None = None) -> str:
        """``prefix`` + random words such that ``count`` of the whole is ``target`` (or as close as
        the tokenizer allows: a word that merges with its neighbour can make one length unreachable)."""
        count = count or self.count
        words: list[str] = []
        best, best_err = "", None
        for _ in range(_FIT_ROUNDS):
            text = prefix + "".join(words)
            err = count(text) - target
            if best_err is None or abs(err) < abs(best_err):
                best, best_err = text, err
            if err == 0:
                return text
            if err < 0:
                words += self.rng.choices(self.words, k=-err)
            elif words:
                del words[max(0, len(words) - err):]
            else:  # the prefix alone is already too long
                break
        return best


def single_token_words(tokenizer: Tokenizer, rng: random.Random) -> list[str]:
    """Space-led lowercase vocabulary words that the tokenizer encodes back into one token."""
    vocab = sorted(tokenizer.backend.get_vocab())
    cands = [" " + m.group(1) for t in vocab if (m := _WORD.fullmatch(t))]
    if len(cands) > _MAX_CANDIDATES:
        cands = rng.sample(cands, _MAX_CANDIDATES)
    encoded = tokenizer.backend.encode_batch(cands, add_special_tokens=False)
    words = [w for w, e in zip(cands, encoded) if len(e.ids) == 1]
    if len(words) < _MIN_WORDS:  # not a BPE/SentencePiece vocabulary we recognise: any word will do
        words = cands or [" lorem", " ipsum", " dolor", " sit", " amet"]
    return sorted(words)


def build_prompts(
    builder: PromptBuilder,
    num: int,
    input_lens: LengthDist,
    output_lens: LengthDist,
    shared_prefix: int = 0,
    num_groups: int = 1,
) -> list[Prompt]:
    """``num`` prompts; with ``shared_prefix`` P, prompt i belongs to group i % ``num_groups`` and
    starts with that group's P-token prefix (the input length counts the prefix)."""
    if num < 0:
        raise WorkloadError(f"number of prompts must be >= 0, got {num}")
    if shared_prefix < 0 or num_groups < 1:
        raise WorkloadError(f"--shared-prefix must be >= 0 and --num-groups >= 1, got {shared_prefix}, {num_groups}")
    rng = builder.rng
    ins, outs = input_lens.sample(rng, num), output_lens.sample(rng, num)
    overhead = builder.overhead()
    floor = overhead + shared_prefix
    if input_lens.minimum() <= floor:
        what = f"--shared-prefix {shared_prefix} plus " if shared_prefix else ""
        raise WorkloadError(
            f"input length {input_lens.minimum()} leaves no room for random text: {what}{overhead} tokens the "
            f"{builder.endpoint} endpoint adds (chat template, BOS) take {floor}"
        )
    ins = [max(i, floor + 1) for i in ins]  # a normal draw can fall below the floor
    if not shared_prefix:
        return [_prompt(builder, i, o, "", None) for i, o in zip(ins, outs)]
    prefixes = [builder.text(shared_prefix, count=builder.raw_count) for _ in range(num_groups)]
    return [_prompt(builder, i, o, prefixes[k % num_groups], k % num_groups) for k, (i, o) in enumerate(zip(ins, outs))]


def _prompt(builder: PromptBuilder, input_len: int, output_len: int, prefix: str, group: int | None) -> Prompt:
    text = builder.text(input_len, prefix)
    return Prompt(text=text, input_len=builder.count(text), output_len=output_len, group=group)
