"""Shared fixtures: an isolated config dir for every test, small real mutation databases, the Docker engine."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from runner.data.db import SCHEMA_SQL

REPO = Path(__file__).resolve().parent.parent
SHARED_DMS = REPO.parent / "shared" / "data" / "dms"
# First 60 residues of TEM-1 beta-lactamase (P62593) and a few real single mutants from Stiffler 2015.
BLAT_HEAD = "MSIQHFRVALIPFFAAFCLPVFAHPETLVKVKDAEDQLGARVGYIELDLNSGKILESFRP"
MINI_ROWS = [
    ("H24A", 1, -0.009783565, 1),
    ("H24C", 1, -0.418259925, 1),
    ("P25A", 1, -2.1, 0),
    ("E26K", 1, 0.05, 1),
    ("H24A:P25G", 2, -1.8, 0),
    ("", 0, 0.0, 1),
]


def make_db(path: Path, rows=MINI_ROWS, source="BLAT_mini", template=BLAT_HEAD, wal: bool = False) -> Path:
    """A real SQLite mutation database with the project's schema."""
    conn = sqlite3.connect(path)
    try:
        if wal:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA_SQL)
        cur = conn.execute("INSERT INTO sources(source_text, template) VALUES (?, ?)", (source, template))
        conn.executemany(
            "INSERT INTO mutations(source_id, mutant, mut_num, DMS_score, DMS_score_bin) VALUES (?, ?, ?, ?, ?)",
            [(cur.lastrowid, *row) for row in rows],
        )
        conn.commit()
    finally:
        conn.close()
    return path


# Test modules that import the training core (torch, Lightning, numpy, pandas) at the top. On a
# host-only install (`pip install -e '.[dev]'`) they are not collected and the run says so; in CI
# (CI=true) a missing core is an error, never a silent skip.
CORE_MODULES = {
    "test_core_components.py",
    "test_core_data.py",
    "test_core_train.py",
    "test_registries.py",
    "test_variants.py",
    "test_vocab.py",
    "test_models_robust.py",
}


def _have_core() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "lightning", "numpy", "pandas"))


def pytest_ignore_collect(collection_path, config):
    if collection_path.name in CORE_MODULES and not _have_core():
        if os.environ.get("CI"):
            raise pytest.UsageError("the training core (torch, lightning) is not installed: pip install -e '.[core]'")
        return True
    return None


def pytest_report_header(config):
    if not _have_core():
        return "core tier not collected: torch/lightning are not installed (pip install -e '.[core]')"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in CORE_MODULES:
            item.add_marker(pytest.mark.core)


@pytest.fixture(autouse=True)
def isolated_config(tmp_path_factory, monkeypatch):
    """Every test gets its own config dir and no inherited INFRA_WORKDIR."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
    monkeypatch.delenv("INFRA_WORKDIR", raising=False)


@pytest.fixture
def mini_db(tmp_path) -> Path:
    return make_db(tmp_path / "mini.db")


@pytest.fixture(scope="session")
def docker_client():
    """A real Docker engine; in CI (CI=true) its absence fails the test instead of skipping it."""
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # any failure to reach the engine means the same thing here
        if os.environ.get("CI"):
            pytest.fail(f"Docker engine unreachable in CI: {exc}")
        pytest.skip(f"Docker engine unreachable: {exc}")
    return client


# End-to-end fixtures (run user, base image, demo workdir) live in tests/e2e.py.
pytest_plugins = ["tests.e2e"]
