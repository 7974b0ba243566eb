"""The repository's own import graph: no circle, arrows only point down (ARCHITECTURE.md).

* the core (``gqaprune``) imports neither mlflow nor argparse, and nothing of tracking, analysis or
  the entry points;
* ``tracking`` imports only ``gqaprune.errors`` and ``gqaprune.config`` of the core (plain values in,
  MLflow out);
* ``analysis`` imports ``tracking`` only (it reads the store; it launches nothing);
* no module-level import circle anywhere (function-local imports count too).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("gqaprune", "tracking", "analysis", "prune_entry")


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def imports_of(path: Path, name: str) -> set[str]:
    """Every imported module name (absolute), function-local imports included."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}    # ``from pkg import module``
    return out


def project_edges() -> dict[str, set[str]]:
    """Module -> the project modules it imports. ``from pkg import sub`` (sub a module) is an edge
    to ``pkg.sub`` only: Python initialises ``pkg`` first anyway, for every submodule alike."""
    mods = modules()
    edges = {}
    for name, path in mods.items():
        found = {m for m in imports_of(path, name) if m in mods and m != name}
        via_sub = {m.rpartition(".")[0] for m in found if m.rpartition(".")[0] in found}
        names_only = _names_imported(path, name, mods)
        edges[name] = (found - via_sub) | (via_sub & names_only)
    return edges


def _names_imported(path: Path, name: str, mods) -> set[str]:
    """Packages from which a non-module name is imported (``from pkg import SomeClass``)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if any(f"{base}.{a.name}" not in mods for a in node.names):
                out.add(base)
    return out


def test_core_imports_no_mlflow_no_argparse_and_nothing_above_it():
    for name, path in modules().items():
        if not name.startswith("gqaprune"):
            continue
        roots = {m.split(".")[0] for m in imports_of(path, name)}
        assert not roots & {"mlflow", "argparse", "tracking", "analysis", "prune_entry"}, (name, roots)


def test_tracking_logs_plain_values_only():
    allowed = {"gqaprune", "gqaprune.errors", "gqaprune.config"}
    mods = modules()
    for name, path in mods.items():
        if name.startswith("tracking"):
            ours = {m for m in imports_of(path, name) if m in mods and not m.startswith("tracking")}
            assert ours <= allowed, (name, ours - allowed)


def test_analysis_reads_through_tracking_only():
    for name, path in modules().items():
        if name.startswith("analysis"):
            ours = {m.split(".")[0] for m in imports_of(path, name)} & set(PACKAGES)
            assert ours <= {"tracking", "analysis"}, (name, ours)


def test_no_import_circle():
    edges = project_edges()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            # importing a package runs its __init__, which is an edge of its own
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_graph_is_not_empty():   # guards the parser above against silently finding nothing
    edges = project_edges()
    assert "gqaprune.arch" in edges["gqaprune.calibrate"]
    assert "tracking.schema" in edges["analysis.query"]
