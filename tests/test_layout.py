"""The package's import graph, read from the source with ast: no cycle, and the supervisor side
never imports the worker side (an engine's imports would load into the supervisor process)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "whatsappd"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The whatsappd modules a file imports, at any depth of its code (function-level imports count)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # "from pkg import mod" imports pkg.mod when that is a module, else a name of pkg.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = {name: _imports(path, modules) for name, path in files.items()}
    # Importing a.b.c runs a/__init__ and a/b/__init__ too, but those edges are the
    # interpreter's, not the code's: a cycle through a package face alone is not counted.
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _worker_side(module: str) -> bool:
    return module == "whatsappd.worker" or module.startswith("whatsappd.worker.")


def test_the_import_graph_has_no_cycle() -> None:
    """No group of whatsappd modules imports each other in a circle, counting imports inside functions."""
    assert _cycles(_graph()) == []


def test_the_supervisor_side_never_imports_the_worker_side() -> None:
    """Only modules under whatsappd/worker/ import whatsappd.worker; testing helpers may start workers but not import them."""
    offenders = {module: sorted(target for target in targets if _worker_side(target))
                 for module, targets in _graph().items() if not _worker_side(module)}
    assert {module: targets for module, targets in offenders.items() if targets} == {}


def test_the_graph_reader_sees_the_imports_it_must() -> None:
    """The checks above are only as good as the reader: it finds known edges, relative and function-level ones too."""
    graph = _graph()
    assert "whatsappd.config" in graph["whatsappd.daemon"]
    assert "whatsappd.protocol" in graph["whatsappd.worker.engine"]
    assert any(_worker_side(target) for target in graph["whatsappd.worker.__main__"])
