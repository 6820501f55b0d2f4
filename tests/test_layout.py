"""The house rules of the layout: core/ imports flow one way (no cycle, counting imports inside
functions) and never reach MLflow or the tracking/entry-point layers; tracking/ never imports an
entry point; entry points stay wiring."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_CORE = ("mlflow", "optuna", "tracking", "entry_points", "mlflow_projects")
MAX_ENTRY_POINT_LINES = 130


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module name `path` imports, at any depth (relative imports resolved)."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names}
    return out


def _layer_modules(layer: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((REPO_ROOT / layer).rglob("*.py"))}


def _import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    return {name: {t for t in map(resolve, _imports(path)) if t and t != name} for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_core_has_no_import_cycle():
    cycle = _find_cycle(_import_graph(_layer_modules("core")))
    assert cycle is None, "import cycle in core: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_core_imports_no_mlflow_nor_the_layers_above_it():
    offending = [f"{name} imports {imported}" for name, path in _layer_modules("core").items()
                 for imported in sorted(_imports(path)) if imported.split(".")[0] in FORBIDDEN_IN_CORE]
    assert not offending, offending


def test_tracking_never_imports_an_entry_point():
    offending = [f"{name} imports {imported}" for name, path in _layer_modules("tracking").items()
                 for imported in sorted(_imports(path)) if imported.split(".")[0] == "entry_points"]
    assert not offending, offending


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "entry_points").glob("*.py")), ids=lambda p: p.name)
def test_entry_points_are_wiring_sized(path: Path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_ENTRY_POINT_LINES, f"{path.name} has {lines} lines: move its science into core/"
