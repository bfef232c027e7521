"""The package's shape: no import cycles, imports point down the layers, short functions.

Read with ``ast`` over every module, counting imports placed inside functions, so a cycle
cannot hide behind a deferred import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medlens"

# Lower layers never import higher ones; a module may import its own package's modules.
LAYERS = [
    {"medlens", "medlens.errors"},
    # medlens.tracking: MLflow logging (imported lazily) that training and the CLI share
    {"medlens.fileio", "medlens.config", "medlens.machine", "medlens.tracking"},
    {"medlens.data", "medlens.modeling", "medlens.evaluation"},
    {"medlens.artifacts"},
    {"medlens.inference"},
    {"medlens.monitoring"},
    {"medlens.interop"},
    {"medlens.reporting"},
    {"medlens.training"},
    {"medlens.serve"},
    {"medlens.bench"},
    {"medlens.cli"},
    {"medlens.__main__"},
]
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "bundled" not in p.parts}


def _imports(path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere in it (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from medlens.x import y` imports the module medlens.x.y when there is one.
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [n for n in subs if n in known]
            if len(names) < len(subs):  # some names are attributes of the module itself
                names.append(node.module)
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(p, set(mods)) - {m} for m, p in mods.items()}


def _layer(module: str) -> tuple[int, str]:
    for i, layer in enumerate(LAYERS):
        for unit in sorted(layer, key=len, reverse=True):
            if module == unit or (unit != "medlens" and module.startswith(unit + ".")):
                return i, unit
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycle():
    assert _cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_point_down_the_layers():
    wrong = []
    for module, targets in import_graph().items():
        level, unit = _layer(module)
        for t in sorted(targets):
            t_level, t_unit = _layer(t)
            if t_level > level or (t_level == level and t_unit != unit and t_unit != "medlens"):
                wrong.append(f"{module} -> {t}")
    assert wrong == []


def test_every_module_is_in_a_layer():
    for module in _modules():
        _layer(module)


@pytest.mark.parametrize("module", sorted(_modules()))
def test_no_function_is_longer_than_80_lines(module):
    tree = ast.parse(_modules()[module].read_text())
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def _public_functions(tree: ast.Module):
    """Module-level functions and methods of module-level classes whose names are public."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{item.name}", item


@pytest.mark.parametrize("module", sorted(_modules()))
def test_public_functions_have_type_hints(module):
    missing = []
    for name, fn in _public_functions(ast.parse(_modules()[module].read_text())):
        if name.split(".")[-1].startswith("_") and not name.endswith("__init__"):
            continue
        args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
        untyped = [a.arg for a in args if a.annotation is None and a.arg not in ("self", "cls")]
        if untyped or (fn.returns is None and not name.endswith("__init__")):
            returns = fn.returns or name.endswith("__init__")
            missing.append(f"{name}({', '.join(untyped)})" + ("" if returns else " -> ?"))
    assert missing == []
