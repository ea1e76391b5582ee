"""The import rule of the package, checked on the source: layers import one way, and no cycles.

    cli, bridge, babysitter -> client -> ipc <- daemon -> journal

``ipc`` (the contract: messages, constants, output layout, locks) imports nothing else of effectd;
the client never imports the daemon or the journal; the package root and ``effectd.progress``
import nothing but each other. Every import counts: module level, inside functions, under
``TYPE_CHECKING``, and lazy loads by name (``"effectd.bridge:bridge"`` strings). Run with ``-s``
to print the module import graph.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "effectd"

LAYER_OF_TOP = {
    "ipc": "ipc", "journal": "journal", "daemon": "daemon", "client": "client",
    "cli": "cli", "unitfiles": "cli", "cliutil": "cliutil", "bridge": "bridge", "babysitter": "babysitter",
    "progress": "root",
}
ALLOWED: dict[str, set[str]] = {
    "root": {"root"},
    "ipc": {"ipc"},
    "journal": {"journal", "ipc"},
    "daemon": {"daemon", "journal", "ipc", "root"},
    "client": {"client", "ipc", "root"},
    "cliutil": {"cliutil", "client", "ipc", "root"},
    # effectctl mounts the babysitter's and the bridge's commands (loaded lazily by name).
    "cli": {"cli", "cliutil", "client", "ipc", "root", "babysitter", "bridge"},
    "bridge": {"bridge", "cliutil", "client", "ipc", "root"},
    "babysitter": {"babysitter", "cliutil", "client", "ipc", "root"},
}
KNOWN_CYCLES: list[set[str]] = []
"""Cycles tolerated for now (none): an entry here is a debt with a reason beside it."""
PROCESS_MAINS = {"effectd.daemon.worker", "effectd.daemon.main"}
"""Modules that are a process's main (``python -m``): run, never imported by another module."""
_BY_NAME = re.compile(r"^(effectd(?:\.\w+)*):\w+$")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(node: ast.AST, here: str, is_package: bool, known: set[str]) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = here.split(".") if is_package else here.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        for alias in node.names:
            sub = f"{mod}.{alias.name}"
            yield sub if sub in known else mod  # ``from pkg import submodule`` imports the submodule
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
        match = _BY_NAME.match(node.value)
        if match:
            yield match.group(1)


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        deps = set()
        for node in ast.walk(tree):
            for target in _imported(node, name, path.name == "__init__.py", known):
                while target and target not in known:  # ``import a.b.c`` of a name inside a module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    return LAYER_OF_TOP[parts[1]]


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in modules() if m != "effectd" and m.split(".")[1] not in LAYER_OF_TOP]
    assert not unplaced, f"add these to LAYER_OF_TOP: {unplaced}"


def test_imports_follow_the_layers() -> None:
    graph = import_graph()
    print()
    for module in sorted(graph):
        print(f"{module} -> {', '.join(sorted(graph[module])) or '-'}")
    wrong = [f"{m} ({layer(m)}) imports {d} ({layer(d)})"
             for m, deps in sorted(graph.items()) for d in sorted(deps) if layer(d) not in ALLOWED[layer(m)]]
    rule = "cli, bridge, babysitter -> client -> ipc <- daemon -> journal"
    assert not wrong, f"imports against {rule}:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    new = [sorted(c) for c in found if c not in KNOWN_CYCLES]
    assert not new, f"import cycles: {new}"
    stale = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not stale, f"these cycles are gone: delete them from KNOWN_CYCLES: {stale}"


def test_process_mains_are_not_imported() -> None:
    graph = import_graph()
    importers = {m: sorted(d & PROCESS_MAINS) for m, d in graph.items() if d & PROCESS_MAINS}
    assert not importers, f"constants shared with a process's main module belong in effectd.ipc: {importers}"


def test_the_checker_sees_lazy_and_relative_imports() -> None:
    """The graph is only worth its assertions if in-function imports and lazy loads count."""
    graph = import_graph()
    assert "effectd.babysitter.cli" in graph["effectd.cli"]  # by name, in LazyGroup.LAZY
    assert "effectd.client" in graph["effectd.cli"]  # in-function and TYPE_CHECKING imports
    assert "effectd.ipc.messages" in graph["effectd.daemon.worker"]  # ``from effectd.ipc import messages``
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
