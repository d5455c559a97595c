"""Imports flow one way (docs ARCHITECTURE): no import cycle between the modules of backbones/, methods/, datamodules/
and benchmark/; backbones/ imports torch and timm only (never methods/, datamodules/ or benchmark/); datamodules/
never imports methods/ or benchmark/, and methods/ never imports datamodules/ or benchmark/.

Read with `ast`, nothing imported: imports inside functions and under TYPE_CHECKING count too (a cycle that only a
lazy import hides is still a cycle)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("backbones", "methods", "datamodules", "benchmark")
# What backbones/ may import besides the standard library and itself; numpy is timm's own dependency, read for
# Google's .npz checkpoints.
BACKBONES_MAY_IMPORT = {"torch", "timm", "numpy"}


def production_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of the four packages (a package's __init__.py under its own name)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """Every dotted name `source` imports: `import M` gives M, `from M import a` gives M.a (a submodule, or a name
    in M), relative imports resolved against the module's package."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            names |= {target if alias.name == "*" else f"{target}.{alias.name}" for alias in node.names}
    return names


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The known module `name` is or lies in (`methods.base.TuningModule` -> `methods.base`), else None."""
    while name not in known:
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return name


def import_graph(modules: dict[str, Path]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> the modules of the four packages it imports, module -> the other top-level names it imports).

    `from methods import full` is an edge to methods.full, `from methods import create_method` one to methods (its
    __init__). Importing a submodule runs its package's __init__ too; that is not an edge (every package __init__
    imports its submodules, so counting it would put each submodule on a cycle)."""
    internal, external = {}, {}
    for module, path in modules.items():
        names = imported_names(path.read_text(), module, path.name == "__init__.py")
        internal[module] = {target for name in names if (target := resolve(name, modules))} - {module}
        external[module] = {name.split(".")[0] for name in names if resolve(name, modules) is None}
    return internal, external


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each holds a cycle), sorted; Tarjan's algorithm."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
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
    return sorted(found)


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    return import_graph(production_modules())


def test_the_cycle_finder_finds_a_cycle_through_three_modules_and_ignores_a_chain():
    chain = {"a": {"b"}, "b": {"c"}, "c": set()}
    assert cycles(chain) == []
    assert cycles({**chain, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}) == [["a", "b"], ["c", "d"]]


def test_imports_resolve_to_modules_not_names_and_count_lazy_and_type_checking_ones(tmp_path):
    for relative, source in {
        "methods/__init__.py": "from methods import full\nfrom methods.base import Base\n",
        "methods/base.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from methods.full import Full\n",
        "methods/full.py": "def f():\n    from . import base\n    import torch.nn\n",
        "backbones/__init__.py": "", "datamodules/__init__.py": "", "benchmark/__init__.py": "",
        "benchmark/run.py": "import methods\nfrom methods import create_method\n",
    }.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(source)
    internal, external = import_graph(production_modules(tmp_path))
    assert internal["methods"] == {"methods.full", "methods.base"}
    assert internal["methods.base"] == {"methods.full"}
    assert internal["methods.full"] == {"methods.base"}
    assert internal["benchmark.run"] == {"methods"}
    assert external["methods.full"] == {"torch"}
    assert cycles(internal) == [["methods.base", "methods.full"]]


def test_no_import_cycle_in_the_production_code(graph):
    internal, _ = graph
    assert len(internal) > 50  # every module was read
    assert cycles(internal) == [], "import cycles (each line one cycle's modules)"


def test_backbones_import_torch_and_timm_only(graph):
    internal, external = graph
    for module in (m for m in internal if m.split(".")[0] == "backbones"):
        assert {t.split(".")[0] for t in internal[module]} <= {"backbones"}, module
        others = external[module] - set(sys.stdlib_module_names) - {"__future__"}
        assert others <= BACKBONES_MAY_IMPORT, f"{module} imports {sorted(others - BACKBONES_MAY_IMPORT)}"


@pytest.mark.parametrize(("package", "never"), [("datamodules", {"methods", "benchmark"}),
                                                ("methods", {"datamodules", "benchmark"})])
def test_datamodules_and_methods_stay_below_benchmark_and_apart(graph, package, never):
    internal, _ = graph
    wrong = {m: sorted(t for t in targets if t.split(".")[0] in never)
             for m, targets in internal.items() if m.split(".")[0] == package}
    assert {m: t for m, t in wrong.items() if t} == {}
