"""Rebuilding a `tokenizers.Tokenizer` from the ``tokenizer.ggml.*`` metadata of a GGUF file.

A GGUF file carries no tokenizer.json: only the vocabulary, the merges, token types and a
pre-tokenizer *name* (``tokenizer.ggml.pre``) that llama.cpp maps to split regexes in C++. We
rebuild byte-level BPE tokenizers ourselves, splitting text the way llama.cpp does for that name,
so ids match the model's training tokenizer. SentencePiece ("llama") vocabularies are handed to
transformers' converter when transformers is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from engine.errors import UnsupportedModelError
from engine.weights.gguf_file import read_metadata

# llama.cpp token types (llama_token_type)
_CONTROL = 3
_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # llama.cpp's SMOLLM/STARCODER: isolate every digit, then the GPT-2 regex (and so does
    # SmolLM2's own tokenizer.json: Digits(individual_digits) + ByteLevel).
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


def _regex_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# tokenizer.ggml.pre -> pre-tokenizer; names as llama.cpp's llama-vocab.cpp spells them.
_PRE_TOKENIZERS = {
    **dict.fromkeys((None, "default", "gpt2", "gpt-2", "mpt", "olmo", "jais"), _gpt2_split),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), _digits_then_gpt2
    ),
    **dict.fromkeys(
        ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"),
        lambda: _regex_then_bytes(_LLAMA3_SPLIT),
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), lambda: _regex_then_bytes(_QWEN2_SPLIT)),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table that byte-level vocabularies are spelled in."""
    ranges = (("!", "~"), ("¡", "¬"), ("®", "ÿ"))
    table = {b: chr(b) for lo, hi in ranges for b in range(ord(lo), ord(hi) + 1)}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tokenizer_from_gguf(path: str | Path) -> tuple[Backend, dict[str, Any]]:
    """``(backend tokenizer, tokenizer_config dict)`` as an HF folder would hold them."""
    md = read_metadata(path)
    kind = md.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in md:
        raise UnsupportedModelError(f"{path}: GGUF carries no tokenizer")
    if kind == "gpt2":
        backend = _byte_level_bpe(md, path)
    elif kind == "llama":
        backend = _via_transformers(path)
    else:
        raise UnsupportedModelError(f"{path}: GGUF tokenizer model {kind!r} is not supported (gpt2, llama)")
    return backend, _tokenizer_config(md, backend)


def _byte_level_bpe(md: dict[str, Any], path: str | Path) -> Backend:
    pre = md.get("tokenizer.ggml.pre")
    if pre not in _PRE_TOKENIZERS:
        raise UnsupportedModelError(
            f"{path}: GGUF pre-tokenizer {pre!r} is not known to splitserve; "
            f"known: {sorted(k for k in _PRE_TOKENIZERS if k)}. Load the model's HF folder instead."
        )
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    types: list[int] = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # llama.cpp stores byte-level tokens in GPT-2's spelling already; respell any that are not
    # (a converter wrote raw text), as transformers does.
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    # Control tokens stay whole and are skippable on decode; user-defined ones stay whole but are text.
    # A "control" token spelled outside the byte alphabet is a converter mislabel: adding it would
    # grow the vocabulary past the model's, so it is left as a plain vocabulary entry.
    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _CONTROL and set(t) <= alphabet
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _USER_DEFINED and t in vocab
        ]
    )
    _set_post_processor(backend, md)
    return backend


def _set_post_processor(backend: Backend, md: dict[str, Any]) -> None:
    """Add BOS/EOS on encode exactly when the file says llama.cpp would."""
    tokens = md["tokenizer.ggml.tokens"]
    single: list[str] = ["$A"]
    specials: list[tuple[str, int]] = []
    for flag, key, at_start in (
        ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.bos_token_id", True),
        ("tokenizer.ggml.add_eos_token", "tokenizer.ggml.eos_token_id", False),
    ):
        token_id = md.get(key)
        if md.get(flag) and token_id is not None:
            token = tokens[token_id]
            single = [token, *single] if at_start else [*single, token]
            specials.append((token, token_id))
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join([*single, *(s.replace("$A", "$B") for s in single)]),
        special_tokens=specials,
    )


def _via_transformers(path: str | Path) -> Backend:
    """SentencePiece vocabularies need score-based merge recovery; transformers already does it."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise UnsupportedModelError(
            f"{path}: a SentencePiece ('llama') GGUF tokenizer needs transformers installed"
        ) from e
    p = Path(path)
    try:
        hf = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as e:  # transformers raises ValueError/KeyError/... for vocabularies it lacks
        raise UnsupportedModelError(f"{path}: transformers could not build its tokenizer ({e})") from e
    return hf.backend_tokenizer


def _tokenizer_config(md: dict[str, Any], backend: Backend) -> dict[str, Any]:
    tokens = md["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        i = md.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    add_bos = md.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:  # llama.cpp's default: SentencePiece vocabularies get BOS, BPE ones do not
        add_bos = md.get("tokenizer.ggml.model") == "llama"
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(add_bos),
        "add_eos_token": bool(md.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    arch = md.get("general.architecture")
    if f"{arch}.context_length" in md:
        cfg["model_max_length"] = int(md[f"{arch}.context_length"])
    if md.get("tokenizer.chat_template"):
        cfg["chat_template"] = md["tokenizer.chat_template"]
    eot = token("eot_token_id")
    if eot is not None and eot != cfg["eos_token"]:
        cfg["extra_eos_tokens"] = [eot]  # llama.cpp stops on end-of-turn too (e.g. <|eot_id|>)
    return cfg
