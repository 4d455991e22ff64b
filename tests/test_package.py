"""The package's shape: no import cycle, no private name crossing modules, light imports of the light modules."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "siimcovid"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def absolute(node: ast.ImportFrom, module: str) -> str:
    """The module an ImportFrom reads from, relative imports resolved."""
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def imports(module: str) -> list[tuple[str, list[str]]]:
    """(module imported from, names) of every import of a siimcovid module, those inside functions included."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((absolute(node, module), [alias.name for alias in node.names]))
    return [(m, names) for m, names in found if m == "siimcovid" or m.startswith("siimcovid.")]


def import_graph() -> dict[str, set[str]]:
    """module -> the siimcovid modules it imports (`from pkg import mod` counts as importing the module)."""
    graph = {}
    for module in MODULES:
        targets = set()
        for source, names in imports(module):
            submodules = {f"{source}.{n}" for n in names if f"{source}.{n}" in MODULES}
            if names and len(submodules) == len(names):
                targets |= submodules
            elif source in MODULES:
                targets |= submodules | {source}
        graph[module] = targets - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "siimcovid.detect.train" in graph["siimcovid.run"]  # imported inside a function only
    assert "siimcovid.metrics" in graph["siimcovid.run"]  # `from siimcovid import metrics`


def test_no_import_cycle():
    graph = import_graph()
    assert find_cycle(graph) is None
    for a, b in [("siimcovid.evaluate", "siimcovid.fuse"), ("siimcovid.fuse", "siimcovid.evaluate")]:
        starts = [m for m in MODULES if m == a or m.startswith(a + ".")]
        reached = set().union(*(reachable(graph, m) for m in starts))
        assert not [m for m in reached if m == b or m.startswith(b + ".")], f"{a} imports {b}"


def test_no_private_name_is_imported_from_another_module():
    private = [
        f"{module}: from {source} import {name}"
        for module in MODULES
        for source, names in imports(module)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert private == []


def test_light_modules_do_not_import_torch():
    """Nor do the rows of `siimcovid runs` and `siimcovid help` (which imports every kind's built-in modules)."""
    light = [
        "siimcovid.cli",
        "siimcovid.runs",
        "siimcovid.run",
        "siimcovid.stages",
        "siimcovid.detect",
        "siimcovid.classify",
        "siimcovid.fuse",
        "siimcovid.data",
    ]
    code = (
        f"import importlib, json, sys\nfor m in {light!r}: importlib.import_module(m)\n"
        "from siimcovid import stages\n"
        "for s in stages.STAGES.values():\n    s.describe and stages.load(s.describe)\n"  # each row of `siimcovid runs`
        "from siimcovid import cli\ncli.listing()\n"  # `siimcovid help`: every registry kind's built-ins imported
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ultralytics', 'timm'))))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
