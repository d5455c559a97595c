"""Tests stand alone: no module under tests/ imports a test module (tests/**/test_*.py) or a conftest.py. What tests
share lives in tests/helpers/ (plain modules) and in conftest fixtures, which pytest hands over by name.

Read with `ast`, so imports inside functions count too, and so do relative ones and `importlib.import_module` of a
literal name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def owning_test_module(dotted: str) -> str | None:
    """The test module (`tests.x.test_y`, or a `tests...conftest`) that `dotted` is or lies inside, else None."""
    parts = dotted.split(".")
    if parts[0] != "tests":
        return None
    ends = [i for i, part in enumerate(parts) if i and (part.startswith("test_") or part == "conftest")]
    return ".".join(parts[:ends[0] + 1]) if ends else None


def package_of(path: Path) -> list[str]:
    """The dotted package a file under the repo root belongs to, e.g. tests/methods/test_vpt.py -> tests.methods."""
    return list(path.relative_to(ROOT).with_suffix("").parts[:-1])


def imported_modules(source: str, package: list[str]) -> list[tuple[int, str]]:
    """(line, dotted name) of every module `source` imports, or may import: for `from M import a`, both M and
    M.a (a may be a submodule); relative imports resolved against `package`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + (node.module.split(".") if node.module else []))
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            found.append((node.lineno, node.args[0].value))
    return found


def found(source: str, package: tuple[str, ...] = ("tests", "methods")) -> list[str]:
    """The test modules `source` imports, as a file in `package` would."""
    return sorted({owning_test_module(name) for _, name in imported_modules(source, list(package))} - {None})


@pytest.mark.parametrize(("source", "expected"), [
    ("from tests.methods.test_methods import train_steps", ["tests.methods.test_methods"]),
    ("import tests.methods.test_vpt as vpt", ["tests.methods.test_vpt"]),
    ("from tests.methods import test_vpt", ["tests.methods.test_vpt"]),
    ("from tests.conftest import TINY_VIT", ["tests.conftest"]),
    ("def f():\n    from tests.datamodules.test_vtab import make_vtab\n", ["tests.datamodules.test_vtab"]),
    ("from .test_sidetune import DeterministicData", ["tests.methods.test_sidetune"]),
    ("from . import test_swin", ["tests.methods.test_swin"]),
    ("from ..benchmark.core.test_cli import make_dry_run", ["tests.benchmark.core.test_cli"]),
    ("import importlib\nimportlib.import_module('tests.benchmark.core.test_faults')",
     ["tests.benchmark.core.test_faults"]),
    ("from tests.helpers.models import make_tiny_vit\nfrom tests.helpers import data", []),
    ("from tests.mutation import run as harness\nimport torch\nfrom methods import create_method", []),
    ("print('from tests.methods.test_vpt import embed')", []),  # text, not an import
])
def test_the_check_sees_every_way_to_import_a_test_module(source, expected):
    assert found(source) == expected


def python_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if ".venv" not in p.parts)


def test_no_module_under_tests_imports_a_test_module_or_conftest():
    files = python_files()
    assert len([p for p in files if p.name.startswith("test_")]) > 50  # the walk found the suite
    offenders = sorted({f"{path.relative_to(ROOT)}:{line}: imports {owning_test_module(name)}"
                        for path in files
                        for line, name in imported_modules(path.read_text(), package_of(path))
                        if owning_test_module(name)})
    assert not offenders, ("a test module imports another test module (or conftest); move what it needs to "
                           "tests/helpers/ or a conftest fixture:\n" + "\n".join(offenders))


def test_helpers_hold_no_tests():
    helpers = sorted((TESTS / "helpers").glob("*.py"))
    assert helpers and not [p.name for p in helpers if p.name.startswith("test_") or p.name == "conftest.py"]
