"""The package's floors: every robuq import points down (or stays inside its own package), and the
module graph has no cycles — read off the source, so a new upward import fails here, not in review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# primitives → kernels (back-ends of the primitives) → model surgery → deploy → files → sampling, evaluation →
# training (which may sample its teacher) → AMPN → command line; robuq/__init__.py is the public face above all.
FLOORS = {
    "robuq.core": 0,
    "robuq.quant": 1,
    "robuq.models": 1,
    "robuq.diffusion": 1,
    "robuq.data": 1,
    "robuq.kernels": 2,
    "robuq.precision": 3,
    "robuq.deploy": 4,
    "robuq.io": 5,
    "robuq.integrations": 5,
    "robuq.sample": 6,
    "robuq.train": 7,
    "robuq.eval": 6,
    "robuq.ampn": 8,
    "robuq.cli": 9,
    "robuq": 10,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(module: str) -> str:
    return module if module == "robuq" else ".".join(module.split(".")[:2])


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported robuq module, whether at module level) for every import in the file."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("robuq"):
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("robuq")]
        found += [(name, id(node) in top_level) for name in names]
    return found


def _graph() -> dict[str, list[tuple[str, bool]]]:
    return {_module_name(p): _imports(p) for p in sorted((SRC / "robuq").rglob("*.py"))}


def test_every_package_has_a_floor():
    packages = {_package(m) for m in _graph()}
    assert packages <= set(FLOORS), f"give these packages a floor in FLOORS: {sorted(packages - set(FLOORS))}"


def test_imports_only_point_down():
    upward = []
    for module, imports in _graph().items():
        here = _package(module)
        for target, _ in imports:
            there = _package(target)
            if there != here and FLOORS[there] >= FLOORS[here]:
                upward.append(f"{module} imports {target} (floor {FLOORS[there]} from floor {FLOORS[here]})")
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def test_module_graph_has_no_cycles():
    graph = _graph()
    edges = {m: {t for t, _ in imports if t in graph and t != m} for m, imports in graph.items()}
    # A package's __init__ re-exporting its own modules is not a cycle of ideas; leave those edges out.
    for m in edges:
        edges[m] = {t for t in edges[m] if not (m == _package(t) and m != "robuq")}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " → ".join(path[path.index(t) :] + [t]) if t in path else t)
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
