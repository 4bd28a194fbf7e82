"""Package layering: who may import whom, checked on the source (every import, wherever it is).

The packages are layered so that each one can be changed, tested and deployed without the
ones above it: `engine` knows nothing of serving, `protocol` holds the cross-process contracts
both sides share, the router and the workers meet only through `protocol`, and only
`splitserve` composes everything. A lazy import inside a function, or one under
``TYPE_CHECKING``, still couples two packages (the first hides a cycle until run time), so
this scan reads every ``import`` node of every file, not just the module-level ones.
"""

from __future__ import annotations

import ast
import itertools
import tomllib
from collections.abc import Iterator
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _our_packages() -> frozenset[str]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return frozenset(p.rstrip("*").rstrip(".") for p in cfg["tool"]["setuptools"]["packages"]["find"]["include"])


OURS = _our_packages()

# package -> the only packages of ours it may import (itself always; third-party always)
ALLOWED: dict[str, frozenset[str]] = {
    "engine": frozenset({"engine", "gpu_kernels"}),
    "protocol": frozenset({"protocol", "engine"}),
    "kvtransfer": frozenset({"kvtransfer", "engine", "protocol"}),
    "worker_runtime": frozenset({"worker_runtime", "protocol", "engine", "kvtransfer"}),
}
# package -> packages of ours it must not import
FORBIDDEN: dict[str, frozenset[str]] = {
    "router": frozenset({"cluster", "prefill_worker", "decode_worker", "worker_runtime", "splitserve"}),
    "prefill_worker": frozenset({"decode_worker", "cluster", "router", "splitserve"}),
    "decode_worker": frozenset({"prefill_worker", "cluster", "router", "splitserve"}),
    "cluster": frozenset({"router", "prefill_worker", "decode_worker", "worker_runtime", "splitserve"}),
}


def _imported_modules(tree: ast.AST, module: str) -> Iterator[tuple[int, str]]:
    """Absolute names of every module an import statement anywhere in the tree names."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = module.split(".")[: -node.level]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            yield node.lineno, name


def _edges() -> list[tuple[str, str, str]]:
    """(importing package, imported package, "file:line") for every import between our packages."""
    edges = []
    for pkg in sorted(OURS):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT)
            module = ".".join(rel.with_suffix("").parts)
            tree = ast.parse(path.read_text(), filename=str(rel))
            for line, name in _imported_modules(tree, module):
                top = name.split(".")[0]
                if top in OURS and top != pkg:
                    edges.append((pkg, top, f"{rel}:{line}"))
    return edges


EDGES = _edges()


def test_the_scan_sees_the_packages_and_lazy_imports() -> None:
    """Guard against a scan that silently finds nothing (a wrong root, a renamed include)."""
    assert {"engine", "protocol", "router", "cluster", "splitserve", "worker_runtime"} <= OURS
    assert any(src == "splitserve" and dst == "router" for src, dst, _ in EDGES)
    lazy = ast.parse("def f():\n    from router.app import create_app\nif TYPE_CHECKING:\n    import cluster.config\n")
    assert [n for _, n in _imported_modules(lazy, "x.y")] == ["router.app", "cluster.config"]
    relative = ast.parse("from .messages import NewRequest\nfrom .. import engine\n")
    assert [n for _, n in _imported_modules(relative, "decode_worker.server")] == ["decode_worker.messages", ""]


@pytest.mark.parametrize("pkg", sorted(ALLOWED))
def test_package_imports_only_its_allowed_layers(pkg: str) -> None:
    bad = [f"{where}: {src} imports {dst}" for src, dst, where in EDGES if src == pkg and dst not in ALLOWED[pkg]]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("pkg", sorted(FORBIDDEN))
def test_package_imports_none_of_its_forbidden_peers(pkg: str) -> None:
    bad = [f"{where}: {src} imports {dst}" for src, dst, where in EDGES if src == pkg and dst in FORBIDDEN[pkg]]
    assert not bad, "\n".join(bad)


def test_the_package_graph_is_acyclic() -> None:
    graph: dict[str, set[str]] = {pkg: set() for pkg in OURS}
    for src, dst, _ in EDGES:
        graph[src].add(dst)
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as e:
        cycle = e.args[1]
        steps = set(itertools.pairwise(cycle))
        where = [w for s, d, w in EDGES if (s, d) in steps]
        pytest.fail(f"import cycle between packages: {' -> '.join(cycle)}\n" + "\n".join(where))
    assert order.index("engine") < order.index("protocol") < order.index("router") < order.index("splitserve")
