"""The layout's promises: a handful of top-level modules, every other module in a package whose
name says its job, no import cycle (imports inside functions and under TYPE_CHECKING count too,
and so does the package `__init__` that Python runs before a module of another package), and
tests that import only the library and `tests/support`, never one another."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "lib" / "emlab"
TOP_LEVEL_ALLOWED = 8  # modules beside __init__.py and cli.py


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in LIB.rglob("*.py"):
        parts = list(path.relative_to(LIB.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _package(module: str, modules: dict[str, tuple[Path, bool]]) -> str:
    return module if modules[module][1] else module.rpartition(".")[0]


def import_graph() -> dict[str, set[str]]:
    """emlab's module → the emlab modules that importing it runs, every import statement counted."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(name, is_package, node.level, node.module) if node.level else (node.module or "")
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target not in modules or target == name:
                    continue
                graph[name].add(target)
                # importing a module of another package first runs that package's __init__ (and its parents')
                here, there = _package(name, modules), _package(target, modules)
                while there and not (here + ".").startswith(there + "."):
                    if there in modules and there != name:
                        graph[name].add(there)
                    there = there.rpartition(".")[0]
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle() -> None:
    graph = import_graph()
    found = cycles(graph)
    detail = "\n".join(
        f"{sorted(c)}:\n" + "\n".join(f"  {a} -> {b}" for a in sorted(c) for b in sorted(graph[a]) if b in c)
        for c in found)
    assert not found, f"import cycles:\n{detail}"


def test_top_level_is_a_handful_of_modules() -> None:
    top = sorted(p.name for p in LIB.glob("*.py") if p.name not in {"__init__.py", "cli.py"})
    assert len(top) <= TOP_LEVEL_ALLOWED, top
    packages = sorted(p.name for p in LIB.iterdir() if (p / "__init__.py").exists())
    assert {"api", "config", "store", "data", "models", "train", "sample", "judge", "measures", "analysis",
            "pipeline", "stages"} <= set(packages), packages


def test_tests_import_no_other_test_module() -> None:
    """Test modules, tests/support and bench import helpers from `support` (tests/ is on sys.path
    under pytest, bench puts it there), never a test module, conftest or `tests.*`."""
    tests = REPO / "tests"
    support = tests / "support"
    # names that would resolve to a file under tests/ when imported bare (tests/ or tests/support/ on sys.path)
    local = {p.stem for p in tests.glob("*.py")} | {p.stem for p in support.glob("*.py")} - {"__init__"}
    offenders = []
    for path in [*tests.glob("*.py"), *support.glob("*.py"), *(REPO / "bench").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            for imported in names:
                head = imported.split(".")[0]
                if head in local or head == "tests":
                    offenders.append(f"{path.relative_to(REPO)} imports {imported}")
    assert not offenders, "\n".join(offenders)
