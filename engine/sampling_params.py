"""`SamplingParams`: how one request samples and stops (OpenAI / vLLM names and defaults).

Validated once, here, so the sampler and the output processor can trust every field; each
error names the field so the router can return it as an OpenAI-shaped 400 unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidRequestError

# vLLM's threshold: below it, temperature means greedy (dividing by ~0 would overflow)
GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)
_INT_FIELDS = ("n", "top_k", "min_tokens", "max_tokens", "logprobs", "seed", "resumed_output_tokens")
_OPTIONAL_FIELDS = ("max_tokens", "logprobs", "seed")
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, int | float) and not isinstance(x, bool)) and math.isfinite(x)


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N alternatives to report, 0..20 (0: only the chosen token)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # a migrated request: the last this-many prompt ids are output tokens already streamed by a
    # worker that died; sampling, stop checks and text continue at their positions
    resumed_output_tokens: int = 0

    def __post_init__(self) -> None:
        self._normalise_types()
        self._check_ranges()

    def _normalise_types(self) -> None:
        """Accept what JSON gives (lists, ints for floats, one string for ``stop``); store tuples
        and floats so instances compare and hash by value."""
        set_ = object.__setattr__  # frozen: normalised once, before anyone sees the instance
        if isinstance(self.stop, str):
            set_(self, "stop", (self.stop,))
        elif isinstance(self.stop, list | tuple):
            set_(self, "stop", tuple(self.stop))
        else:
            raise InvalidRequestError(f"stop: expected a string or a list of strings, got {self.stop!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError("stop: every stop sequence must be a non-empty string")
        ids = self.stop_token_ids
        if not isinstance(ids, list | tuple) or not all(_is_int(t) and t >= 0 for t in ids):
            raise InvalidRequestError(f"stop_token_ids: expected a list of non-negative ints, got {ids!r}")
        set_(self, "stop_token_ids", tuple(ids))
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            if not _is_number(v):
                raise InvalidRequestError(f"{name}: expected a finite number, got {v!r}")
            set_(self, name, float(v))
        for name in _INT_FIELDS:
            v = getattr(self, name)
            if not (_is_int(v) or (v is None and name in _OPTIONAL_FIELDS)):
                raise InvalidRequestError(f"{name}: expected an integer, got {v!r}")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"{name}: expected a boolean, got {getattr(self, name)!r}")

    def _check_ranges(self) -> None:
        def bad(name: str, rule: str) -> InvalidRequestError:
            return InvalidRequestError(f"{name}: must be {rule}, got {getattr(self, name)!r}")

        if self.n < 1:
            raise bad("n", ">= 1")
        if self.temperature < 0:
            raise bad("temperature", ">= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]")
        if self.top_k < -1:
            raise bad("top_k", "-1 or 0 (off), or >= 1")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "> 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", ">= 1")
        if self.min_tokens < 0:
            raise bad("min_tokens", ">= 0")
        if self.resumed_output_tokens < 0:
            raise bad("resumed_output_tokens", ">= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"<= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad("logprobs", f"in 0..{MAX_LOGPROBS}")
        if self.seed is not None and not _INT64_MIN <= self.seed <= _INT64_MAX:
            raise bad("seed", "a signed 64-bit integer")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    def for_child(self, index: int) -> SamplingParams:
        """Params of the ``index``-th of ``n`` parallel samples: one sequence each, and distinct
        seeds (``seed + index``, as vLLM) so seeded siblings don't produce identical text."""
        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists, not tuples): safe for msgpack/JSON on the wire."""
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamplingParams:
        """Inverse of `to_dict`; an unknown key is an error naming it, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        for k in d:
            if k not in known:
                raise InvalidRequestError(f"{k}: unknown sampling parameter")
        return cls(**d)
