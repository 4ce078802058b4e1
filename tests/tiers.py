"""Test tiers, read from the test modules themselves (docs/testing.md states the rule).

A test module is in the core tier when its module-level `pytestmark` names `pytest.mark.core`; every
other test module is host tier. The declaration is read from the source with `ast`, never by importing
the module: on a host-only install a core module cannot be imported, so conftest leaves it uncollected
by reading this declaration, and tests/test_tiers.py checks with the same reader that no host module
imports the training core when it is imported.

Standard library only: conftest imports this module in every tier.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
TIER_ENV = "INFRA_TEST_TIER"
TIERS = ("all", "host", "core")
# What the training core imports that a host-only install (`pip install -e '.[dev]'`) must do without.
CORE_PROBES = ("torch", "lightning")
_IMPORT_FUNCS = {("pytest", "importorskip"), ("importlib", "import_module")}


def in_ci() -> bool:
    """CI=true (any value but empty, 0, false, no): absent engines and cores fail instead of skipping."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@functools.cache
def core_packages() -> frozenset[str]:
    """Import names that make a module core tier: the `core` extra's distributions, and `runner.core`."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    extra = pyproject["project"]["optional-dependencies"]["core"]
    names = {re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].replace("-", "_") for requirement in extra}
    return frozenset(names | {"pytorch_lightning", "runner.core"})


def is_core_name(name: str) -> bool:
    """Whether importing the dotted `name` needs the training core."""
    return any(name == pkg or name.startswith(pkg + ".") for pkg in core_packages())


@dataclass(frozen=True)
class ModuleTier:
    """What a test or support module declares and imports, as read from its source."""

    path: Path
    marks: frozenset[str]  # the names in its module-level `pytestmark`
    problems: tuple[str, ...]  # `pytestmark` not written as literal `pytest.mark.NAME` entries
    imports: tuple[tuple[int, str], ...]  # (line, dotted name) imported while the module is imported

    @property
    def core(self) -> bool:
        return "core" in self.marks


@functools.cache
def read_module(path: Path) -> ModuleTier:
    """The tier declaration and import-time imports of the module at `path` (parsed, not imported)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    marks: set[str] = set()
    problems: list[str] = []
    for node in tree.body:
        target, value = _assignment(node)
        if target == "pytestmark" and value is not None:
            for entry in value.elts if isinstance(value, ast.List | ast.Tuple) else [value]:
                name = _mark_name(entry)
                if name is None:
                    problems.append(f"line {entry.lineno}: pytestmark entry is not a literal pytest.mark.NAME")
                else:
                    marks.add(name)
    visitor = _ImportTime()
    visitor.visit(tree)
    return ModuleTier(path, frozenset(marks), tuple(problems), tuple(visitor.imports))


def core_imports(path: Path) -> list[tuple[int, str]]:
    """The imports that run when `path` is imported and need the training core, as (line, name).

    Counted: a core package (`is_core_name`), and a module of tests/ that is core tier or itself
    imports the core at import time (so `from tests.test_core_train import X` counts).
    """
    return _core_imports(path, set())


def _core_imports(path: Path, seen: set[Path]) -> list[tuple[int, str]]:
    found = []
    for line, name in read_module(path).imports:
        if is_core_name(name):
            found.append((line, name))
            continue
        dep = tests_module_file(name)
        if dep is None or dep in seen:
            continue
        seen.add(dep)
        if read_module(dep).core or _core_imports(dep, seen):
            found.append((line, name))
    return found


def tests_module_file(name: str) -> Path | None:
    """The file of `tests.X` (or `tests`) when it exists."""
    parts = name.split(".")
    if parts[0] != "tests":
        return None
    path = TESTS.joinpath(*parts[1:]).with_suffix(".py") if len(parts) > 1 else TESTS / "__init__.py"
    return path if path.is_file() else None


def _assignment(node: ast.stmt) -> tuple[str | None, ast.expr | None]:
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id, node.value
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id, node.value
    return None, None


def _mark_name(node: ast.expr) -> str | None:
    """NAME of `pytest.mark.NAME` or `pytest.mark.NAME(...)`, else None."""
    if isinstance(node, ast.Call):
        node = node.func
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "mark"
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "pytest"
    ):
        return node.attr
    return None


class _ImportTime(ast.NodeVisitor):
    """Imports that run when the module is imported: its body, including if/try/with/class bodies,
    decorators and default values, but not function bodies (those run only when called).

    Counts `import X`, `from X import Y` (as X and X.Y), `pytest.importorskip("X")`,
    `importlib.import_module("X")` and a module-level `pytest_plugins = [...]`.
    """

    def __init__(self) -> None:
        self.imports: list[tuple[int, str]] = []

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for decorator in node.decorator_list:
            self.visit(decorator)
        self.visit(node.args)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.visit(node.args)

    def visit_Import(self, node: ast.Import) -> None:
        self.imports += [(node.lineno, alias.name) for alias in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # only tests/ is a package here
            base = "tests" + (f".{base}" if base else "")
        self.imports.append((node.lineno, base))
        self.imports += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and (func.value.id, func.attr) in _IMPORT_FUNCS
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            self.imports.append((node.lineno, node.args[0].value))
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        target, value = _assignment(node)
        if target == "pytest_plugins" and isinstance(value, ast.List | ast.Tuple):
            self.imports += [
                (node.lineno, e.value) for e in value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)
            ]
        self.generic_visit(node)
