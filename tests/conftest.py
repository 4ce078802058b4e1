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


# Test modules that import the training core (torch, Lightning, numpy, pandas) at the top. On a
# host-only install (`pip install -e '.[dev]'`) they are not collected and the run says so; in CI
# (CI=true) a missing core is an error, never a silent skip.
CORE_MODULES = {
    "test_core_components.py",
    "test_core_data.py",
    "test_core_train.py",
    "test_core_plots.py",
    "test_registries.py",
    "test_variants.py",
    "test_vocab.py",
    "test_model_robustness.py",
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
    have_core = _have_core()
    for item in items:
        if item.path.name in CORE_MODULES:
            item.add_marker(pytest.mark.core)
        if not have_core and item.get_closest_marker("core"):
            item.add_marker(pytest.mark.skip(reason="needs the training core: pip install -e '.[core]'"))


PG_REFERENCE = SHARED_DMS / "raw" / "proteingym_reference" / "DMS_substitutions.csv"
PG_RAW_BLAT = SHARED_DMS / "raw" / "blat_ecolx_stiffler2015" / "BLAT_ECOLX_Ranganathan2015.csv"
PG_FOLDS = ("fold_random_5", "fold_modulo_5", "fold_contiguous_5")


def make_proteingym_folder(dest: Path) -> Path:
    """A small folder shaped like ProteinGym's substitution release, made from the shared real data.

    - DMS_substitutions.csv: ProteinGym's reference file cut to the three BLAT_ECOLX assays used here
      (all columns kept);
    - BLAT_ECOLX_Stiffler_2015.csv: 600 real variants (Stiffler 2015, ampicillin 2500) in the
      supervised layout: mutant, mutated_sequence, DMS_score, DMS_score_bin, the three fold columns;
    - BLAT_ECOLX_Firnberg_2014.csv: 300 further variants in the unsupervised layout (no folds);
    - BLAT_ECOLX_Deng_2012.csv: 200 variants whose last row names a wrong wild-type letter (fails);
    - notes.csv: a table that is not an assay (ignored).
    """
    import csv
    import random

    if not PG_REFERENCE.is_file() or not PG_RAW_BLAT.is_file():
        pytest.skip(f"the shared ProteinGym data ({PG_REFERENCE.parent}) is not present")
    dest.mkdir(parents=True, exist_ok=True)
    with PG_REFERENCE.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header, rows = reader.fieldnames, list(reader)
    keep = {"BLAT_ECOLX_Stiffler_2015", "BLAT_ECOLX_Firnberg_2014", "BLAT_ECOLX_Deng_2012"}
    assays = {r["DMS_id"]: r for r in rows if r["DMS_id"] in keep}
    with (dest / "DMS_substitutions.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(assays.values())
    with PG_RAW_BLAT.open(newline="", encoding="utf-8-sig") as fh:
        raw = [(r["mutant"], float(r["2500"])) for r in csv.DictReader(fh)]
    template = assays["BLAT_ECOLX_Stiffler_2015"]["target_seq"]
    cutoff = float(assays["BLAT_ECOLX_Stiffler_2015"]["DMS_binarization_cutoff"])
    rng = random.Random(7)

    def write(name: str, variants, folds: bool) -> None:
        columns = ["mutant", "mutated_sequence", "DMS_score", "DMS_score_bin", *(PG_FOLDS if folds else ())]
        with (dest / name).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            for mutant, score in variants:
                pos = int(mutant[1:-1])
                seq = template[: pos - 1] + mutant[-1] + template[pos:]
                row = [mutant, seq, repr(score), int(score >= cutoff)]
                if folds:
                    row += [rng.randrange(5), (pos - 1) % 5, min((pos - 1) * 5 // len(template), 4)]
                writer.writerow(row)

    write("BLAT_ECOLX_Stiffler_2015.csv", raw[:600], folds=True)
    write("BLAT_ECOLX_Firnberg_2014.csv", raw[600:900], folds=False)
    bad = raw[900:1100]
    mutant, score = bad[-1]
    bad[-1] = ("W" if mutant[0] != "W" else "A") + mutant[1:], score  # wrong wild-type letter
    write("BLAT_ECOLX_Deng_2012.csv", bad, folds=False)
    (dest / "notes.csv").write_text("what,where\nnothing,here\n", encoding="utf-8")
    return dest


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
