"""Dependencies point one way: libs <- services <- app shell <- tools (chaos, bench); services never import each
other; and no import cycle between modules. Read from the source (AST), so a lazy import counts too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("ingestion", "writer", "coordinator", "picker", "worker")
LAYER = {"libs": 0, **dict.fromkeys(SERVICES, 1), "app": 2, "chaos": 3, "bench": 3}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in LAYER:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """First-party modules ``path`` imports (names without the ``dsched.`` prefix)."""
    tree = ast.parse(path.read_text())
    nodes: list[ast.AST] = []
    if top_level_only:
        for node in tree.body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue  # typing only: no runtime edge
            nodes.extend(ast.walk(node) if isinstance(node, ast.Try | ast.If) else [node])
    else:
        nodes = list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.startswith("dsched."):
                out.add(name.removeprefix("dsched."))
    return out


def test_dependencies_point_one_way() -> None:
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        own = name.split(".")[0]
        for target in _imports(path, top_level_only=False):
            other = target.split(".")[0]
            if other not in LAYER or other == own:
                continue
            if LAYER[other] > LAYER[own] or (LAYER[own] == LAYER[other] == 1):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {
        name: {t for t in _imports(path, top_level_only=True) if t in modules and t != name}
        for name, path in modules.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_test_sees_the_code() -> None:
    """Guards the two tests above against passing vacuously (e.g. after a move)."""
    modules = _modules()
    assert {"libs.models", "app.runner", "worker.service"} <= set(modules)
    assert "libs.models" in _imports(modules["worker.service"], top_level_only=True)
