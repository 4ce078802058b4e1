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
