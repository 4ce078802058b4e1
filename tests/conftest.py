"""Shared fixtures: an isolated config dir for every test, small real mutation databases, the Docker engine."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from runner.dbschema import SCHEMA_SQL

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


# The lab's layout exactly as the original design note gives it (no types, `source` as the key):
# databases made by the lab's own script look like this.
LAB_DDL = """CREATE TABLE sources(id, source_text, template);
CREATE TABLE mutations(id, mutant, DMS_score, DMS_score_bin, mut_num, source REFERENCES sources(id));
"""
# What infra 0.1 wrote (`source_id`, `sources.description`): such databases must keep working.
INFRA_01_SQL = """
CREATE TABLE IF NOT EXISTS sources (
    id          INTEGER PRIMARY KEY,
    source_text TEXT NOT NULL UNIQUE,
    template    TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS mutations (
    id            INTEGER PRIMARY KEY,
    source_id     INTEGER NOT NULL REFERENCES sources(id),
    mutant        TEXT NOT NULL DEFAULT '',
    mut_num       INTEGER NOT NULL,
    DMS_score     REAL,
    DMS_score_bin INTEGER
);
CREATE INDEX IF NOT EXISTS mutations_source ON mutations(source_id);
"""
LAYOUTS = {"infra": (SCHEMA_SQL, "source"), "lab": (LAB_DDL, "source"), "infra-0.1": (INFRA_01_SQL, "source_id")}


def make_db(
    path: Path, rows=MINI_ROWS, source="BLAT_mini", template=BLAT_HEAD, wal: bool = False, layout: str = "infra"
) -> Path:
    """A real SQLite mutation database in one of LAYOUTS (ids given explicitly, as the lab's script does)."""
    ddl, key = LAYOUTS[layout]
    conn = sqlite3.connect(path)
    try:
        if wal:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(ddl)
        conn.execute("INSERT INTO sources(id, source_text, template) VALUES (1, ?, ?)", (source, template))
        conn.executemany(
            f"INSERT INTO mutations(id, {key}, mutant, mut_num, DMS_score, DMS_score_bin) VALUES (?, 1, ?, ?, ?, ?)",
            [(i, *row) for i, row in enumerate(rows, start=1)],
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
