"""The layout keeps its shape: no import cycle among the library's modules, production code never imports
benchmark code, and flows only orchestrate the library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
LIBRARY = PROJECT / "pipeline"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path) -> dict[str, Path]:
    return {_module_name(p): p for p in root.rglob("*.py") if "__pycache__" not in p.parts}


def _imports(name: str, path: Path) -> set[str]:
    """Every module `path` imports anywhere in it (function-level imports included), as dotted names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules(LIBRARY)
    return {name: (_imports(name, path) & modules.keys()) - {name} for name, path in modules.items()}


def _a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done and (found := visit(nxt, path + [nxt])):
                return found
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (found := visit(start, [start])):
            return found
    return None


def test_the_library_has_no_import_cycle():
    graph = _graph()
    assert {"pipeline.io", "pipeline.io.wafer_table", "pipeline.train", "pipeline.evaluate"} <= graph.keys()
    assert _a_cycle(graph) is None, " -> ".join(_a_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _a_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("root", ["pipeline", "flows"])
def test_production_code_never_imports_benchmarks_or_tests(root):
    for name, path in _modules(PROJECT / root).items():
        imported = {module.split(".")[0] for module in _imports(name, path)}
        assert not imported & {"benchmarks", "tests"}, f"{path} imports {imported & {'benchmarks', 'tests'}}"
