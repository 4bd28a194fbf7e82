"""The worker loops drive the engine through its methods (``step``, ``add_request``, ``stats``...),
never through its parts: a loop that reaches into ``engine.scheduler`` re-implements the step."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"scheduler", "runner", "blocks", "pool"}


def _is_engine(node: ast.expr) -> bool:
    """``engine`` or ``<anything>.engine`` (``self.engine``, ``self.loop.engine``)."""
    return (isinstance(node, ast.Name) and node.id == "engine") or (
        isinstance(node, ast.Attribute) and node.attr == "engine"
    )


def engine_internals(source: str) -> list[tuple[int, str]]:
    return sorted(
        (node.lineno, node.attr)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN and _is_engine(node.value)
    )


def test_the_scan_finds_what_it_forbids() -> None:
    src = "def f(self, engine):\n    self.engine.scheduler.add(1)\n    engine.pool\n    self.engine.step()\n"
    assert engine_internals(src) == [(2, "scheduler"), (3, "pool")]


def test_worker_packages_use_only_engine_methods() -> None:
    files = sorted((ROOT / "prefill_worker").glob("*.py")) + sorted((ROOT / "decode_worker").glob("*.py"))
    assert len(files) >= 10  # both packages were found
    hits = [
        f"{f.relative_to(ROOT)}:{line}: engine.{attr}" for f in files for line, attr in engine_internals(f.read_text())
    ]
    assert hits == []
