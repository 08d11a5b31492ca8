"""The code's shape: no import cycles, lmcore never imports flows, and every import inside a function says why.

The graph is read from the source (ast), so the test costs no imports and sees the lazy imports too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.code

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    out = {}
    for path in [*ROOT.glob("lmcore/**/*.py"), *ROOT.glob("flows/*.py")]:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imported(tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    """Project modules an import statement anywhere in ``tree`` names, with their parent packages."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    found = {n for n in names if n in modules}
    return found | {".".join(n.split(".")[:i]) for n in found for i in range(1, n.count(".") + 1)} & set(modules)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            if comp:
                out.append([v, *comp])

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_and_lmcore_never_imports_flows():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = _imported(ast.parse(path.read_text()), modules) - {name}
        graph[name] = {d for d in deps if not name.startswith(d + ".")}  # a package's own __init__ is no cycle
    assert "lmcore.machine" in graph["lmcore.model.decode"]  # the graph has the edges (decode times on the machine)
    assert _cycles(graph) == []
    assert not [m for m, deps in graph.items() if m.startswith("lmcore") and any(d.startswith("flows") for d in deps)]


def test_a_fabricated_cycle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "c", "b"]]


def test_every_import_inside_a_function_says_why():
    """Imports sit at module top; the exceptions (slow libraries, the CLI's --help) carry ``# lazy: <reason>``
    on their line or on the import just above, as a group."""
    unexplained = []
    for name, path in _modules().items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for stmt in ast.walk(node):
                if isinstance(stmt, ast.Import | ast.ImportFrom):
                    here, above = lines[stmt.lineno - 1], lines[stmt.lineno - 2]
                    if "# lazy:" not in here and "lazy:" not in above:
                        unexplained.append(f"{name}:{stmt.lineno}: {here.strip()}")
    assert not unexplained, "\n".join(unexplained)
