"""
The shape of the package: every module small enough to read in one sitting,
no import cycle (function-level imports included), and the seams kept: only
the storage package knows which store it has.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cosedge"
MAX_LINES = 600


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The cosedge modules ``path`` imports, at any depth of the file."""
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cosedge"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.startswith("cosedge"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in files and m != name} for name, path in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_no_module_is_too_long_to_read_in_one_sitting() -> None:
    """Every module of cosedge/ has at most 600 lines."""
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_import_graph_has_no_cycle() -> None:
    """No module imports one that imports it back, directly or through others, at any depth of the file."""
    graph = _graph()
    assert (
        "cosedge.web.resource" in graph and "cosedge.origins" in graph["cosedge.web.resource"]
    )  # the walk sees imports
    assert _cycles(graph) == []


def test_a_cycle_would_be_found() -> None:
    """The cycle check finds one when there is one (so that its silence means something)."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_only_storage_and_the_builder_know_which_store_there_is() -> None:
    """Web, fill, admin and ops code use the storage interfaces, never the disk store itself."""
    knows = sorted(
        name
        for name, imports in _graph().items()
        if "cosedge.storage.disk" in imports and not name.startswith("cosedge.storage")
    )
    assert knows == ["cosedge.service"]
