"""Our top-level packages must not shadow a module another installed distribution ships.

transformers 5 depends on Hugging Face's ``kernels`` distribution; while ours was also called
``kernels``, ``import transformers`` found our package and failed, in every environment that
installed both. This catches the next such clash at test time instead of at a user's import.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def our_packages() -> list[str]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = cfg["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({p.rstrip("*") for p in patterns})


def test_no_top_level_package_is_shadowed():
    owners = importlib.metadata.packages_distributions()
    ours = our_packages()
    assert "gpu_kernels" in ours and "engine" in ours
    clashes = {name: owners[name] for name in ours if set(owners.get(name, [])) - {"splitserve"}}
    assert not clashes, f"top-level packages also shipped by other distributions: {clashes}"


def test_transformers_imports_beside_us():
    import transformers.integrations.hub_kernels  # imports the `kernels` distribution when present

    import gpu_kernels.ops  # noqa: F401

    assert transformers.integrations.hub_kernels is not None
