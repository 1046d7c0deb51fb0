"""Dependencies point one way: libs <- services <- app shell <- tools (chaos, bench); services never import each
other; and no import cycle between modules. Read from the source (AST), so a lazy import counts too. Product code
has no ``assert`` statement (``python -O`` drops them)."""

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


def _product_files() -> list[Path]:
    """Every module the ``dsched`` package ships except the benchmarks (``dsched/<package>`` are links)."""
    files: list[Path] = []
    for entry in sorted((ROOT / "dsched").iterdir()):
        if entry.name == "bench":
            continue
        if entry.is_dir():
            files.extend(sorted(entry.resolve().rglob("*.py")))
        elif entry.suffix == ".py":
            files.append(entry)
    return files


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


def test_product_code_has_no_assert() -> None:
    """``python -O`` removes assert statements: product code narrows types and checks invariants without them."""
    found = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in _product_files()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assert)
    ]
    assert not found, "assert statements in product code:\n" + "\n".join(found)


def test_the_test_sees_the_code() -> None:
    """Guards the tests above against passing vacuously (e.g. after a move)."""
    modules = _modules()
    assert {"libs.models", "app.runner", "worker.service"} <= set(modules)
    assert "libs.models" in _imports(modules["worker.service"], top_level_only=True)
    product = {path.relative_to(ROOT).as_posix() for path in _product_files()}
    assert {"dsched/__init__.py", "libs/models.py", "worker/service.py", "chaos/faults.py"} <= product
    assert not any(name.startswith("bench/") for name in product)


# Tests import helpers, never each other ---------------------------------------------------------------------
TESTS = ROOT / "tests"


def _test_module(name: str) -> bool:
    """Whether ``name`` is a module or package under ``tests/``."""
    parts = name.split(".")
    if parts[0] != "tests":
        return False
    path = ROOT.joinpath(*parts)
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _tests_imported(source: str, module: str) -> set[str]:
    """The modules under ``tests/`` that the source of ``module`` (dotted, e.g. ``tests.unit.test_x``) imports:
    ``import``, ``from ... import`` (relative too, and a module imported from a package), lazy or not, and the
    names in ``pytest_plugins``."""
    package = module.split(".") if module.endswith("__init__") else module.split(".")[:-1]
    package = [p for p in package if p != "__init__"]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            origin = ".".join([*base, *(node.module or "").split(".")]).strip(".")
            for alias in node.names:
                names.add(f"{origin}.{alias.name}" if _test_module(f"{origin}.{alias.name}") else origin)
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytest_plugins" for t in node.targets
        ):
            names |= {c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return {name for name in names if name.split(".")[0] == "tests"}


def _shared_test_code(name: str) -> bool:
    """What a test module may import from ``tests/``: the helpers, a conftest, the bare ``tests`` package."""
    return name in ("tests", "tests.helpers") or name.startswith("tests.helpers.") or name.endswith(".conftest")


def test_tests_import_only_helpers_not_other_test_modules() -> None:
    """What test modules share lives in ``tests/helpers/``: importing a test module runs (and re-collects) its
    tests, and couples one suite to another's internals."""
    wrong = []
    for path in sorted(TESTS.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for name in sorted(_tests_imported(path.read_text(), module)):
            if not _shared_test_code(name):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "test modules importing other test modules (move the shared code to tests/helpers/):\n" + (
        "\n".join(wrong)
    )


def test_the_test_import_check_sees_every_form() -> None:
    """Guards the test above against passing vacuously: each way of importing a test module is caught."""
    here = "tests.integration.test_semantics"
    caught = {
        "from tests.unit.test_deploy import metric_names": {"tests.unit.test_deploy"},
        "from tests.contract import test_store as s": {"tests.contract.test_store"},
        "import tests.unit.test_deploy": {"tests.unit.test_deploy"},
        "def f():\n    from .test_pipeline import parse": {"tests.integration.test_pipeline"},
        "from . import test_pipeline": {"tests.integration.test_pipeline"},
        "from ..unit.test_deploy import x": {"tests.unit.test_deploy"},
        "pytest_plugins = ['tests.unit.test_deploy']": {"tests.unit.test_deploy"},
    }
    for source, expected in caught.items():
        found = _tests_imported(source, here)
        assert found == expected, (source, found)
        assert not all(_shared_test_code(name) for name in found), source
    for source in (
        "from tests.helpers.cluster import Api",
        "from tests.helpers import backends",
        "from .conftest import x",
        "import dsched.libs.models",
    ):
        assert all(_shared_test_code(name) for name in _tests_imported(source, here)), source
    assert _test_module("tests.helpers.cluster") and not _test_module("tests.helpers.cluster.Api")
