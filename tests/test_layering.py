"""The package's layers point down, and no two modules import each other.

Every module of :mod:`lowrank_ggn` is parsed with :mod:`ast`; every import counts,
at module level or inside a function, except those under ``if TYPE_CHECKING:``
(they never run), which still count for the layering rule. Importing
``a.b.c`` also runs the package ``a.b``'s ``__init__``: that edge counts too (it is
how a function-level import hid the ``linearization`` ↔ ``engine`` cycle).

Layers, lowest first: ``core`` → ``approx``/``diagnostics``/``operators``/
``reference`` → ``curvature``/``functional`` → ``optim`` → ``app`` and the package's
``__init__``. A module may import its own layer and the layers below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lowrank_ggn"

#: Rank of each layer: a module may import modules of its own or a lower rank.
LAYERS = {
    "lowrank_ggn.core": 0,
    "lowrank_ggn.approx": 1,
    "lowrank_ggn.diagnostics": 1,
    "lowrank_ggn.operators": 1,
    "lowrank_ggn.reference": 1,
    "lowrank_ggn._batch": 2,
    "lowrank_ggn.curvature": 2,
    "lowrank_ggn.functional": 2,
    "lowrank_ggn.dataset_diagonal": 2,
    "lowrank_ggn.optim": 3,
    "lowrank_ggn.app": 4,
    "lowrank_ggn.__main__": 4,
    "lowrank_ggn": 4,
}


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """``{dotted name: file}`` for every module of the package (packages by name)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, typing_only: bool = False):
    """Yield ``(node, typing_only)`` for every import in ``tree``, at any depth."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, typing_only
        elif isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.body:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), True)
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), False)
        else:
            yield from _imports(node, typing_only)


def _targets(name: str, path: Path, node, modules: dict[str, Path]) -> list[str]:
    """The package's modules that ``node`` (in module ``name``) names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = (
                name.split(".")
                if path.name == "__init__.py"
                else (name.split(".")[:-1])
            )
            package = package[: len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        names = [
            f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
            for alias in node.names
        ]
    found = []
    for target in names:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target.startswith("lowrank_ggn"):
            found.append(target)
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(
    modules: dict[str, Path] | None = None,
) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(runtime, all)`` edges ``module -> imported modules`` of the package.

    ``runtime`` leaves out ``TYPE_CHECKING`` imports and adds, for an import of
    ``a.b.c``, the packages ``a.b`` whose ``__init__`` that import runs (those that
    do not contain the importing module). ``all`` holds every named module.
    """
    modules = module_files() if modules is None else modules
    runtime: dict[str, set[str]] = {name: set() for name in modules}
    named: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        own = set(_ancestors(name)) | {name}
        for node, typing_only in _imports(tree):
            for target in _targets(name, path, node, modules):
                if target == name:
                    continue
                named[name].add(target)
                if typing_only:
                    continue
                runtime[name].add(target)
                runtime[name].update(
                    p for p in _ancestors(target) if p not in own and p in modules
                )
    return runtime, named


def layer(name: str) -> int:
    """The rank of the layer ``name`` belongs to (the longest matching prefix)."""
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best]


def layering_violations(named: dict[str, set[str]]) -> list[str]:
    """``"a -> b"`` for every import of a higher layer."""
    return sorted(
        f"{a} -> {b}"
        for a, targets in named.items()
        for b in targets
        if layer(b) > layer(a)
    )


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def test_every_module_has_a_layer():
    for name in module_files():
        assert layer(name) >= 0


def test_core_imports_no_upper_layer():
    _, named = import_graph()
    assert layering_violations(named) == []


def test_no_import_cycles():
    runtime, _ = import_graph()
    assert import_cycles(runtime) == []


@pytest.fixture
def toy_package(tmp_path: Path) -> Path:
    root = tmp_path / "lowrank_ggn"
    for folder in ("core", "core/engine", "approx"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    return root


def test_the_checks_find_a_hidden_cycle_and_an_upward_import(toy_package: Path):
    """A function-level import and a package ``__init__`` still close a cycle."""
    root = toy_package
    (root / "core/engine/__init__.py").write_text(
        "from lowrank_ggn.core.engine.run import go\n"
    )
    (root / "core/engine/run.py").write_text("from lowrank_ggn.core.lin import Lin\n")
    (root / "core/engine/capture.py").write_text("X = 1\n")
    (root / "core/lin.py").write_text(
        "def f():\n    from lowrank_ggn.core.engine.capture import X\n"
        "    from lowrank_ggn.approx import sub\n"
    )
    (root / "approx/sub.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from lowrank_ggn.core.lin import Lin\n"
    )
    runtime, named = import_graph(module_files(root))
    assert import_cycles(runtime) == [
        [
            "lowrank_ggn.core.engine",
            "lowrank_ggn.core.engine.run",
            "lowrank_ggn.core.lin",
        ]
    ]
    assert layering_violations(named) == [
        "lowrank_ggn.core.lin -> lowrank_ggn.approx.sub"
    ]
    assert "lowrank_ggn.core.lin" not in runtime["lowrank_ggn.approx.sub"]
