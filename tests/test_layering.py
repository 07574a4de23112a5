"""The import rules of the architecture guide, enforced: serving -> billing -> metering, and no cycles.

- A package imports only its own layer or the layers below it: `metering` imports neither `billing`
  nor `serving`, `billing` never imports `serving` (`serving` may import both).
- No import cycles among the modules of `serving/`, `billing/` and `metering/`.

The graph is read from the source with `ast`, nothing is imported. Every import statement counts:
at module level, inside functions (deferred imports hide cycles, they do not remove them) and under
`if TYPE_CHECKING:` (a type-only import upward is still a dependency upward). `from pkg import name`
is an edge to the submodule `pkg.name` when there is one, else to `pkg` itself; `import a.b` is an edge
to `a.b`.

The last tests run the checker on tiny package trees in `tmp_path`, so it is known to fail on a
cycle and on an upward import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Higher imports lower (or its own layer), never the other way.
LAYERS: dict[str, int] = {"metering": 0, "billing": 1, "serving": 2}

Graph = dict[str, set[str]]


# --- the checker ---------------------------------------------------------------------------
def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(root: Path, packages: Sequence[str]) -> Iterator[tuple[str, Path]]:
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            yield module_name(root, path), path


def _resolve(known: set[str], name: str) -> str | None:
    """The longest prefix of `name` that is one of our modules (None: not ours)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def _imported(module: str, is_package: bool, tree: ast.AST, known: set[str]) -> Iterator[str]:
    """Our modules that `module` imports (absolute names), wherever the statement sits."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
            yield from submodules
            if len(submodules) < len(node.names):  # some name is an attribute of `base` itself
                yield base


def import_graph(root: Path, packages: Sequence[str]) -> Graph:
    files = dict(source_files(root, packages))
    known = set(files)
    graph: Graph = {name: set() for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for target in _imported(name, path.name == "__init__.py", tree, known):
            resolved = _resolve(known, target)
            if resolved is not None and resolved != name:
                graph[name].add(resolved)
    return graph


def upward_imports(graph: Graph, layers: Mapping[str, int]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a lower layer imports a higher one."""
    top = {name: name.split(".")[0] for name in graph}
    return sorted(
        (src, dst) for src, targets in graph.items() for dst in targets if layers[top[dst]] > layers[top[src]]
    )


def import_cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
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
            component: list[str] = []
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
    return sorted(found)


# --- the rules, on the real tree -----------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> Graph:
    return import_graph(ROOT, list(LAYERS))


def test_the_graph_sees_the_packages(graph: Graph) -> None:
    assert {"serving.app", "billing.engine", "metering.ledger"} <= set(graph)
    assert "metering.events" in graph["metering.recorder"]


def test_dependencies_point_one_way(graph: Graph) -> None:
    """serving -> billing -> metering: never an import up the layers."""
    assert upward_imports(graph, LAYERS) == []


def test_no_import_cycles(graph: Graph) -> None:
    cycles = import_cycles(graph)
    assert cycles == [], "modules that import each other:\n" + "\n".join(", ".join(c) for c in cycles)


# --- the checker fails when it should ------------------------------------------------------
def _tree(root: Path, files: Mapping[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


CLEAN = {
    "metering/__init__.py": "",
    "metering/events.py": "import json\n",
    "billing/__init__.py": "",
    "billing/engine.py": "from metering import events\nfrom metering.events import X\n",
    "serving/__init__.py": "",
    "serving/app.py": "from serving.routes import router\nimport billing.engine\n",
    "serving/routes/__init__.py": "from .chat import router\n",
    "serving/routes/chat.py": "from ..errors import Boom\nimport metering.events as ev\n",
    "serving/errors.py": "class Boom(Exception): ...\n",
}


def test_checker_passes_a_clean_tree_and_resolves_relative_imports(tmp_path: Path) -> None:
    graph = import_graph(_tree(tmp_path, CLEAN), list(LAYERS))
    assert graph["serving.routes"] == {"serving.routes.chat"}
    assert graph["serving.routes.chat"] == {"serving.errors", "metering.events"}
    assert graph["billing.engine"] == {"metering.events"}  # `from metering import events`: the submodule
    assert upward_imports(graph, LAYERS) == []
    assert import_cycles(graph) == []


def test_checker_finds_an_upward_import_even_inside_a_function(tmp_path: Path) -> None:
    files = {
        **CLEAN,
        "metering/events.py": "def later() -> None:\n    from billing.engine import price\n",
        "billing/engine.py": "import typing\nif typing.TYPE_CHECKING:\n    from serving import app\n",
    }
    graph = import_graph(_tree(tmp_path, files), list(LAYERS))
    assert upward_imports(graph, LAYERS) == [
        ("billing.engine", "serving.app"),
        ("metering.events", "billing.engine"),
    ]


def test_checker_finds_a_cycle_through_deferred_and_relative_imports(tmp_path: Path) -> None:
    files = {
        **CLEAN,
        # serving: app -> routes -> routes.chat -> errors -> app
        "serving/errors.py": "def render() -> None:\n    from . import app\n",
        "metering/a.py": "from metering import b\n",
        "metering/b.py": "import metering.a\n",
    }
    graph = import_graph(_tree(tmp_path, files), list(LAYERS))
    assert import_cycles(graph) == [
        ["metering.a", "metering.b"],
        ["serving.app", "serving.errors", "serving.routes", "serving.routes.chat"],
    ]
    assert upward_imports(graph, LAYERS) == []
