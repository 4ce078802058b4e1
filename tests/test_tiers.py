"""The tier rule of docs/testing.md, checked on the test modules' source (host tier: needs no torch).

A module that imports the training core when it is imported must declare `pytestmark = pytest.mark.core`
(written literally), so that the host tier can leave it uncollected; conftest and the support modules
it loads must never import the core.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.tiers import REPO, TESTS, core_imports, core_packages, read_module


def _where(path, found) -> str:
    lines = {}
    for line, name in found:
        lines.setdefault(line, name)
    return ", ".join(f"{path.name}:{line} imports {name}" for line, name in sorted(lines.items()))


def test_a_module_that_imports_the_core_declares_the_core_tier():
    undeclared = [
        _where(path, found)
        for path in sorted(TESTS.glob("test_*.py"))
        if (found := core_imports(path)) and not read_module(path).core
    ]
    assert undeclared == [], (
        "these test modules import the training core when imported but do not declare "
        "`pytestmark = pytest.mark.core` (docs/testing.md): " + "; ".join(undeclared)
    )


def test_tier_declarations_are_literal():
    problems = [f"{p.name}: {problem}" for p in sorted(TESTS.glob("test_*.py")) for problem in read_module(p).problems]
    assert problems == []


def test_conftest_and_what_it_loads_never_import_the_core():
    conftest = TESTS / "conftest.py"
    assert core_imports(conftest) == []
    loaded = {name for _, name in read_module(conftest).imports if name.startswith("tests.")}
    assert {"tests.tiers", "tests.e2e"} <= loaded  # the reader sees pytest_plugins too


def test_core_packages_follow_the_core_extra():
    assert {"torch", "lightning", "numpy", "pandas", "scipy", "runner.core"} <= core_packages()
    assert not {"typer", "docker", "pydantic", "runner"} & core_packages()


def test_the_reader_sees_what_runs_at_import_and_nothing_else(tmp_path, monkeypatch):
    source = textwrap.dedent(
        """
        import pytest
        from runner import core
        import numpy.linalg as la

        try:
            import pandas
        except ImportError:
            pandas = None

        pytestmark = [pytest.mark.core, pytest.mark.slow(reason="x"), MARKS]
        scipy = pytest.importorskip("scipy")

        class Case:
            import matplotlib

        @pytest.mark.skipif(pytest.importorskip("pyarrow") is None, reason="")
        def test_x(arg=__import__("json")):
            import torch
            from runner.core import cli
        """
    )
    path = tmp_path / "test_probe.py"
    path.write_text(source)
    module = read_module(path)
    assert module.marks == {"core", "slow"}
    assert module.problems == ("line 11: pytestmark entry is not a literal pytest.mark.NAME",)
    found = {name for _, name in core_imports(path)}
    assert found == {"runner.core", "numpy.linalg", "pandas", "scipy", "matplotlib", "pyarrow"}


def test_host_tier_collects_without_importing_torch(tmp_path):
    """Collecting the host tier where torch and lightning cannot be imported at all: no module of it
    imports them, and the core modules are left out (not skipped) by their own declaration."""
    for name in ("torch", "lightning"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked: host tier')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env.update(INFRA_TEST_TIER="host", PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    collected = {line.split("::")[0] for line in result.stdout.splitlines() if "::" in line}
    core_modules = {f"tests/{p.name}" for p in TESTS.glob("test_*.py") if read_module(p).core}
    assert core_modules and not core_modules & collected
    assert "tests/test_tiers.py" in collected
    assert f"host tier: {len(core_modules)} core module(s) not collected, by design" in result.stdout


def test_an_engine_test_without_the_docker_mark_stops_the_collection():
    """CI runs the core tier's tests that lack the docker mark beside the host leg's engine tests: a test
    that reaches the engine through a fixture, however indirectly, must carry the mark."""
    from types import SimpleNamespace

    import pytest

    from tests.conftest import _check_engine_marks

    def item(nodeid, fixtures, docker):
        return SimpleNamespace(
            nodeid=nodeid,
            fixturenames=fixtures,
            get_closest_marker=lambda name: object() if name == "docker" and docker else None,
        )

    _check_engine_marks(
        [item("t::ok", ["tmp_path", "base_image", "docker_client"], True), item("t::pure", ["x"], False)]
    )
    with pytest.raises(pytest.UsageError, match=r"t::a, t::b: use the Docker engine .* add @pytest.mark.docker"):
        _check_engine_marks([item("t::a", ["seeds", "base_image"], False), item("t::b", ["docker_client"], False)])
