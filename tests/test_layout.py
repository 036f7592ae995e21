"""The house rules, checked on the source: imports go one way, no import circle, modules and functions stay
readable (SPEC §1 and STYLE.md)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mmfuse", "extract", "shards", "train", "fusion", "bench")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# Modules every package may import: they import nothing of ours but other leaves, at module level or in a function.
LEAVES = {
    *("mmfuse.errors", "mmfuse.settings", "mmfuse.commands", "extract.errors", "shards.schema"),
    *("train.errors", "train.config_record"),
}
# Modules that import only leaves when they are imported, so that loading them loads no model and no pipeline; a
# function of theirs may import more (train.config checks a model's settings against fusion.MODELS).
LIGHT = {"train.config"}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path], module_level: bool = False) -> set[str]:
    """Modules of ours that ``name`` imports, at module level or inside functions (``module_level``: only those
    imported when ``name`` is, outside every function)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    tree = ast.parse(path.read_text())
    for node in outside_functions(tree) if module_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def outside_functions(node: ast.AST) -> Iterator[ast.AST]:
    """``node`` and every node below it that is not in the body of a function (run when the module is imported)."""
    yield node
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from outside_functions(child)


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_anywhere() -> None:
    assert cycles(graph()) == []


def test_imports_go_one_way() -> None:
    allowed = {
        "fusion": {"fusion"},
        "shards": {"shards"},
        "extract": {"extract", "shards"},
        "train": {"train", "fusion", "shards", "extract"},
        "bench": {"bench", "fusion", "shards", "extract", "train"},
    }
    wrong = []
    for name, targets in graph().items():
        top = name.split(".")[0]
        for target in targets - LEAVES:
            if top in allowed and target.split(".")[0] not in allowed[top]:
                wrong.append(f"{name} -> {target}")
            if target.startswith("bench") and not (top == "bench" or name == "mmfuse.cli"):
                wrong.append(f"{name} -> {target} (bench is imported by the dispatcher only)")
    assert wrong == []


def test_leaf_modules_import_nothing_of_ours() -> None:
    """A leaf imports no module of ours but other leaves (extract.errors builds on mmfuse.errors)."""
    edges = graph()
    assert {leaf: edges[leaf] - LEAVES for leaf in LEAVES} == {leaf: set() for leaf in LEAVES}
    assert not any(edges[name] & LEAVES for name in edges if name.startswith("fusion"))  # fusion: torch only


def test_light_modules_import_only_leaves_when_imported() -> None:
    known = modules()
    found = {name: imports(name, known[name], known, module_level=True) - LEAVES for name in LIGHT}
    assert found == {name: set() for name in LIGHT}


def functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_modules_and_functions_stay_readable() -> None:
    """No module over ~400 lines; a function over 60 lines says why in its docstring ("Long: ...")."""
    too_long = []
    for name, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"module {name}: {len(text.splitlines())} lines")
        for fn in functions(ast.parse(text)):
            length = fn.end_lineno - fn.lineno + 1
            if length > MAX_FUNCTION_LINES and "Long:" not in (ast.get_docstring(fn) or ""):
                too_long.append(f"{name}.{fn.name}: {length} lines")
    assert too_long == []


def test_every_named_error_derives_from_mmfuse_error() -> None:
    """The command line catches one type; fusion (torch only) keeps builtin bases and train converts them."""
    import importlib
    import inspect

    from mmfuse.errors import MmfuseError

    found = {}
    for name in modules():
        if name.split(".")[0] in ("extract", "shards", "train") and not name.endswith("__main__"):
            module = importlib.import_module(name)
            for attr, value in vars(module).items():
                if inspect.isclass(value) and issubclass(value, Exception) and value.__module__ == name:
                    found[f"{name}.{attr}"] = issubclass(value, MmfuseError)
    assert len(found) >= 12
    assert [name for name, ok in found.items() if not ok] == []
