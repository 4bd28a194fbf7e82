"""`Tokenizer`: text <-> token ids and the chat template, from an HF model folder or a GGUF file.

A thin layer over the `tokenizers` library (no transformers at run time): the router tokenizes
every request with it, and the workers detokenize with it, so both must agree with what the model
was trained on. BOS/EOS follow the folder's tokenizer_config.json (``add_bos_token``), the same
rule transformers applies.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from engine import chat_template
from engine.errors import InvalidRequestError, ModelNotFoundError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """One model's tokenizer: the `tokenizers` backend plus what tokenizer_config.json adds to it."""

    def __init__(
        self, backend: Backend, config: dict[str, Any] | None = None, extra_eos_token_ids: Iterable[int] = ()
    ) -> None:
        """``config`` is a tokenizer_config.json dict; ``extra_eos_token_ids`` come from generation_config."""
        self.backend = backend
        self.config = dict(config or {})
        self.special_tokens = {
            name: tok for name in _SPECIAL_NAMES if (tok := _token_text(self.config.get(name))) is not None
        }
        self.chat_template: str | None = _pick_template(self.config.get("chat_template"))
        self.add_bos_token = bool(self.config.get("add_bos_token", False))
        self.add_eos_token = bool(self.config.get("add_eos_token", False))
        self.bos_token_id = self._id_of(self.special_tokens.get("bos_token"))
        self.eos_token_id = self._id_of(self.special_tokens.get("eos_token"))
        self.pad_token_id = self._id_of(self.special_tokens.get("pad_token"))
        eos = [self.eos_token_id] if self.eos_token_id is not None else []
        eos += [i for t in self.config.get("extra_eos_tokens", []) if (i := self._id_of(t)) is not None]
        eos += list(extra_eos_token_ids)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))  # ordered, no duplicates

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def from_model_dir(cls, path: str | Path) -> Tokenizer:
        """Read tokenizer.json, tokenizer_config.json and a chat template from its usual places."""
        folder = Path(path)
        tok_file = folder / TOKENIZER_FILE
        if not tok_file.is_file():
            raise ModelNotFoundError(f"{folder}: no {TOKENIZER_FILE}")
        config = _read_json(folder / TOKENIZER_CONFIG_FILE)
        template = _template_file(folder)
        if template is not None:
            config["chat_template"] = template
        generation = _read_json(folder / "generation_config.json")
        extra = generation.get("eos_token_id")
        extra_ids = extra if isinstance(extra, list) else ([extra] if isinstance(extra, int) else [])
        return cls(Backend.from_file(str(tok_file)), config, extra_ids)

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        from engine.gguf_tokenizer import tokenizer_from_gguf

        backend, config = tokenizer_from_gguf(path)
        return cls(backend, config)

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json, loadable by us and by transformers."""
        folder = Path(folder)
        self.backend.save(str(folder / TOKENIZER_FILE))
        text = json.dumps(self.config, indent=2, ensure_ascii=False) + "\n"
        (folder / TOKENIZER_CONFIG_FILE).write_text(text, encoding="utf-8")

    # ---- text <-> ids -----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequestError(f"prompt: expected a string, got {type(text).__name__}")
        try:
            ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:  # the backend refuses str it cannot convert to UTF-8, i.e. lone surrogates
            raise InvalidRequestError(f"prompt: {_unicode_problem(text)}") from None
        if add_special_tokens:
            # tokenizer.json post-processors usually add BOS themselves; this covers the ones that
            # leave it to the tokenizer_config flag, without ever adding it twice.
            if self.add_bos_token and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
                ids.insert(0, self.bos_token_id)
            if self.add_eos_token and self.eos_token_id is not None and ids[-1:] != [self.eos_token_id]:
                ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce (added tokens included); the model's may be padded larger."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    # ---- chat -------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for OpenAI-style messages; encode it with ``add_special_tokens=False``."""
        if self.chat_template is None:
            raise InvalidRequestError("this model has no chat template; use a plain completion prompt")
        return chat_template.render(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
            special_tokens=self.special_tokens, **kwargs,
        )

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a model folder or a ``.gguf`` file (a folder of one GGUF counts as that file)."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        return Tokenizer.from_gguf(p)
    if p.is_dir():
        if (p / TOKENIZER_FILE).is_file():
            return Tokenizer.from_model_dir(p)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return Tokenizer.from_gguf(ggufs[0])
    raise ModelNotFoundError(f"no tokenizer at {p} (expected {TOKENIZER_FILE} or a .gguf file)")


def _unicode_problem(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid Unicode (lone surrogate U+{ord(text[e.start]):04X} at character {e.start})"
    return "the tokenizer cannot encode this text"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _template_file(folder: Path) -> str | None:
    """transformers >= 4.43 saves the template beside tokenizer_config.json; those files win."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    as_json = _read_json(folder / "chat_template.json").get("chat_template")
    return as_json if as_json else None


def _pick_template(value: Any) -> str | None:
    """A template string, or the ``default`` one of a named list ([{"name", "template"}, ...])."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) and value else None


def _token_text(value: Any) -> str | None:
    """Special tokens are saved either as a string or as a serialized AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
