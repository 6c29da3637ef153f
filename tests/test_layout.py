"""The layout shows the architecture: creditaudit's modules import one another without a cycle
(counting imports inside functions too: a lazy import is still a dependency), and the layers keep
their distance — reports never import the trainer, rules never import reports, and the generic
config engine imports nothing of creditaudit but its errors, which import nothing."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "creditaudit"


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the creditaudit modules it imports (``from pkg import submodule`` names the submodule)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                subs = {f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in mods}
                deps |= subs if len(subs) == len(node.names) else subs | {module}
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_keep_their_distance():
    graph = import_graph()

    def reaches(src_prefix: str, dst_prefix: str) -> list[tuple[str, str]]:
        return [
            (m, d)
            for m, deps in graph.items()
            if m.startswith(src_prefix)
            for d in deps
            if d.startswith(dst_prefix)
        ]

    assert reaches("creditaudit.reports", "creditaudit.training") == []
    assert reaches("creditaudit.rules", "creditaudit.reports") == []
    assert reaches("creditaudit.rules", "creditaudit.training.trainer") == []
    assert graph["creditaudit.typedconfig"] <= {"creditaudit.errors"}
    assert graph["creditaudit.errors"] == set()
