"""``splitserve models pull`` as a user sees it: one conversion bar on stderr, the path once on stdout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.model_store import DEFAULT_MODEL_NAME, default_gguf_path, is_complete
from splitserve.cli import main


def test_pull_shows_conversion_progress_and_prints_the_path_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], smollm2_path: Path
) -> None:
    gguf = default_gguf_path()
    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path))
    (tmp_path / "models" / "gguf").mkdir(parents=True)
    (tmp_path / "models" / "gguf" / gguf.name).symlink_to(gguf)  # convert, without downloading again

    assert main(["models", "pull"]) == 0
    out, err = capsys.readouterr()
    target = tmp_path / "models" / DEFAULT_MODEL_NAME
    assert out == f"{target}\n" and is_complete(target)
    bars = re.findall(rf"converting {re.escape(gguf.name)}: +100%\|[^|]*\| (\d+)/(\d+)", err)
    assert bars and bars[-1][0] == bars[-1][1], err[-2000:]  # the bar reached its end
    assert err.count(str(target)) <= 1  # stderr may say where it is once; stdout is the answer

    assert main(["models", "pull"]) == 0  # cached: no conversion, same single line
    out, err = capsys.readouterr()
    assert out == f"{target}\n" and "converting" not in err
