"""Tokenizer, chat template and incremental detokenization against transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.errors import InvalidRequestError, ModelNotFoundError
from engine.model_store import default_gguf_path
from engine.tokenizer import Tokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world!",
    "héllo 世界 🙂",
    "Ünïcödé ñ ß ø — 日本語のテキスト, 한국어, العربية",
    "👨\u200d👩\u200d👧\u200d👦 🏳️\u200d🌈 🇫🇷",
    "def f(x):\n\treturn x ** 2  # square\n\nprint(f(3))",
    "  leading and trailing  ",
    "a\n\n\nb\r\nc\t\td    e",
    "I'm sure they'll say it's fine; we've done it.",
    "price: $3.50, 1,000,000 items on 2024-01-01T00:00:00Z",
    "<|im_start|>user\nhi<|im_end|>",
    "<file_sep>main.py<jupyter_code>x = 1",
    "",
    " ",
    "<p class=\"x\">&amp; &lt;tag&gt;</p>",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 世界 🙂"}],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Write <b>code</b>\n\twith tabs"},
    ],
]


@pytest.fixture(scope="module")
def gguf_path(smollm2_path: Path) -> Path:
    return default_gguf_path()


@pytest.fixture(scope="module")
def hf_tok(gguf_path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def from_gguf(gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def tok(smollm2_path: Path) -> Tokenizer:
    return load_tokenizer(smollm2_path)


def test_token_ids_match_transformers(tok: Tokenizer, from_gguf: Tokenizer, hf_tok) -> None:
    for text in TEXTS:
        want = hf_tok(text).input_ids
        assert tok.encode(text) == want, text
        assert from_gguf.encode(text) == want, text
        assert tok.encode(text, add_special_tokens=False) == hf_tok(text, add_special_tokens=False).input_ids


def test_decode_matches_transformers(tok: Tokenizer, hf_tok) -> None:
    for text in TEXTS:
        ids = hf_tok(text).input_ids
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
        assert "<|im_end|>" not in tok.decode(ids) and "<file_sep>" not in tok.decode(ids)
        assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids) == text


def test_digits_split_as_llama_cpp_does(tok: Tokenizer, from_gguf: Tokenizer) -> None:
    # llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json) isolates every digit
    # before the GPT-2 regex, so "  1" keeps its two spaces as one token. transformers' GGUF loader
    # does not know the name "smollm" and splits them ("Ġ", "Ġ"): the one place we differ from it.
    ids = tok.encode("x  1")
    assert [tok.id_to_token(i) for i in ids] == ["x", "ĠĠ", "1"]
    assert from_gguf.encode("x  1") == ids
    assert [tok.id_to_token(i) for i in tok.encode("12345")] == list("12345")


def test_chat_template_matches_transformers(tok: Tokenizer, from_gguf: Tokenizer, hf_tok) -> None:
    for messages in CONVERSATIONS:
        for gen in (True, False):
            want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == want
            assert from_gguf.apply_chat_template(messages, add_generation_prompt=gen) == want
    prompt = tok.apply_chat_template(CONVERSATIONS[0])
    assert tok.encode(prompt, add_special_tokens=False) == hf_tok.apply_chat_template(
        CONVERSATIONS[0], tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]


def test_template_environment_matches_transformers(tok: Tokenizer, hf_tok) -> None:
    """trim/lstrip blocks, tojson without HTML escaping, loop controls, namespace, special tokens."""
    template = (
        "{%- set ns = namespace(n=0) -%}\n"
        "{% for m in messages %}\n"
        "  {% if m.role == 'skip' %}{% continue %}{% endif %}\n"
        "  {% set ns.n = ns.n + 1 %}\n"
        "  {{ bos_token }}{{ m | tojson }}|{{ m.content | tojson(indent=2) }}\n"
        "{% endfor %}\n"
        "{{ ns.n }}{{ eos_token }}{% if add_generation_prompt %}>>{% endif %}"
    )
    messages = [{"role": "user", "content": "<a href='x'>&</a> é"}, {"role": "skip", "content": "no"}]
    custom = Tokenizer(tok.backend, {**tok.config, "chat_template": template})
    want = hf_tok.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    assert custom.apply_chat_template(messages) == want
    assert "\\u00e9" not in want and "<a href='x'>" in want


def test_template_helpers_and_errors(tok: Tokenizer) -> None:
    raising = Tokenizer(tok.backend, {"chat_template": "{{ raise_exception('roles must alternate') }}"})
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        raising.apply_chat_template([{"role": "user", "content": "x"}])
    dated = Tokenizer(tok.backend, {"chat_template": "{{ strftime_now('%Y') }}"})
    assert dated.apply_chat_template([{"role": "user", "content": "x"}]).isdigit()
    with pytest.raises(InvalidRequestError, match="no chat template"):
        Tokenizer(tok.backend, {}).apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hello",
        [{"content": "no role"}],
        ["not a dict"],
        [{"role": "user", "content": 3}],
        [{"role": "user"}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": "x", "extra": object()}],
    ],
)
def test_invalid_messages_raise(tok: Tokenizer, messages: object) -> None:
    with pytest.raises(InvalidRequestError):
        tok.apply_chat_template(messages)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "where"), [("abc\ud800", "U\\+D800 at character 3"), ("\udfff", "U\\+DFFF at character 0")]
)
def test_lone_surrogates_are_an_invalid_request(tok: Tokenizer, text: str, where: str) -> None:
    """JSON can carry "\\ud800"; the backend refuses it with a bare TypeError, which a server reports as 500."""
    with pytest.raises(InvalidRequestError, match=f"^prompt: not valid Unicode \\(lone surrogate {where}\\)$"):
        tok.encode(text)
    assert tok.encode(json.loads('"\\ud83d\\ude00"')) == tok.encode("😀")  # JSON joins a surrogate pair


def test_text_parts_are_joined(tok: Tokenizer) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template([{"role": "user", "content": "a\nb"}])


def test_special_ids_and_sizes(tok: Tokenizer, from_gguf: Tokenizer, hf_tok) -> None:
    for t in (tok, from_gguf):
        assert t.eos_token_ids == (hf_tok.eos_token_id,) == (2,)
        assert t.bos_token_id == hf_tok.bos_token_id
        assert t.pad_token_id == hf_tok.pad_token_id
        assert t.vocab_size == len(hf_tok) == 49152
        # every control token of the GGUF (ids 0..16), a superset of transformers' named ones
        assert t.all_special_ids == set(range(17)) >= set(hf_tok.all_special_ids)


def test_saved_folder_loads_in_transformers(smollm2_path: Path, hf_tok) -> None:
    hf_dir = transformers.AutoTokenizer.from_pretrained(str(smollm2_path))
    for text in TEXTS:
        assert hf_dir(text).input_ids == hf_tok(text).input_ids, text
    assert hf_dir.apply_chat_template(CONVERSATIONS[1], tokenize=False) == hf_tok.apply_chat_template(
        CONVERSATIONS[1], tokenize=False
    )


def test_template_file_wins_and_generation_eos(tmp_path: Path, smollm2_path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_path / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text("J{{ messages[0].content }}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    t = Tokenizer.from_model_dir(tmp_path)
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "Jx"
    assert t.eos_token_ids == (2, 0)
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "S{{ messages[0].content }}"}))
    assert Tokenizer.from_model_dir(tmp_path).apply_chat_template([{"role": "user", "content": "y"}]) == "Sy"


def test_add_bos_from_config(tok: Tokenizer) -> None:
    t = Tokenizer(tok.backend, {**tok.config, "add_bos_token": True})
    assert t.encode("hi") == [t.bos_token_id, *tok.encode("hi")]
    assert t.encode("hi", add_special_tokens=False) == tok.encode("hi")
    assert t.encode("<|im_start|>hi") == tok.encode("<|im_start|>hi")  # never twice


def test_missing_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        load_tokenizer(tmp_path)
    with pytest.raises(ModelNotFoundError):
        Tokenizer.from_model_dir(tmp_path)


# ---- incremental detokenization ----------------------------------------------------------------

STREAM_TEXTS = [
    "héllo 世界 🙂",
    "👨\u200d👩\u200d👧\u200d👦 ok 🇫🇷 日本語のテキスト",
    "plain ascii, then ñ and 🙂🙂🙂",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_incremental_detokenization_never_splits_a_character(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the text does split characters across tokens
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some tokens had to be held back
    assert "".join(pieces) == detok.text == tok.decode(ids) == text


def test_incremental_detokenization_after_a_prompt(tok: Tokenizer) -> None:
    chat = tok.apply_chat_template([{"role": "user", "content": "say hi"}])
    prompt = tok.encode(chat, add_special_tokens=False)
    out = [*tok.encode("Sure — héllo 世界 🙂!"), tok.eos_token_id]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
        pieces = [detok.add(i) for i in out]
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == tok.decode(out, skip_special_tokens=skip)


def test_flush_returns_held_back_bytes(tok: Tokenizer) -> None:
    ids = tok.encode("🙂")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok)
    assert detok.add(ids[0]) == ""
    assert detok.flush() == tok.decode(ids[:1])  # the stream ended mid-character: say so
