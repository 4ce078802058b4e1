"""Shared fixtures: an isolated config dir for every test, small real mutation databases, the Docker engine."""

from __future__ import annotations

import os
import re
import sqlite3
import sys
from pathlib import Path

import pytest

import tests.helpers  # noqa: F401  first: it sees what importing runner.cli sets (helpers.cli)
from runner.data.db import SCHEMA_SQL
from tests.tiers import CORE_PROBES, TIER_ENV, TIERS, in_ci, is_core_name, read_module

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


# --- test tiers (docs/testing.md) ----------------------------------------------------------------------
# Each test module declares its own tier: `pytestmark = pytest.mark.core` at its top makes it core tier
# (it needs torch/Lightning), anything else is host tier; single tests of a host module may carry
# `@pytest.mark.core`. INFRA_TEST_TIER selects: `all` (default), `host` (core tests deselected and core
# modules not even imported, by design) or `core`. In CI (CI=true) a missing training core is a failure
# unless the host tier was chosen explicitly.
TIER = pytest.StashKey[str]()
LEFT_OUT = pytest.StashKey[list]()


def _have_core() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in CORE_PROBES)


def pytest_configure(config):
    tier = os.environ.get(TIER_ENV, "").strip() or "all"
    if tier not in TIERS:
        raise pytest.UsageError(f"{TIER_ENV}={tier!r}: use one of {', '.join(TIERS)} (unset means all)")
    have_core = _have_core()
    if tier == "host" and have_core and in_ci():
        raise pytest.UsageError(
            f"{TIER_ENV}=host in CI must run on a Python without the training core (.ci/run's host venv), "
            f"but {sys.executable} imports torch: the leg would not show that the host tier needs no torch"
        )
    if tier != "host" and not have_core:
        if tier == "core" or in_ci():
            raise pytest.UsageError(
                f"the training core (torch, lightning) is not installed for {sys.executable}: "
                f"pip install -e '.[core]' (or run only the host tier: {TIER_ENV}=host)"
            )
        tier = "host"  # a developer's host-only install: the header and the summary say what was left out
    config.stash[TIER] = tier
    config.stash[LEFT_OUT] = []


def pytest_report_header(config):
    tier = config.stash[TIER]
    if tier == "host" and os.environ.get(TIER_ENV, "").strip() != "host":
        return "test tier: host only (torch/lightning are not installed: pip install -e '.[core]' for the core tier)"
    return f"test tier: {tier} ({TIER_ENV}={os.environ.get(TIER_ENV) or 'unset'})"


class _CoreModuleLeftOut(pytest.File):
    """A core module in the host tier: not imported (it would need torch), so it holds no tests."""

    def collect(self):
        return []


def pytest_pycollect_makemodule(module_path, parent):
    """In the host tier a core module is never imported: its own declaration, read with ast, says so.
    (This hook, unlike pytest_ignore_collect, also sees a module named on the command line.)"""
    if parent.config.stash[TIER] == "host" and read_module(module_path).core:
        parent.config.stash[LEFT_OUT].append(module_path)
        return _CoreModuleLeftOut.from_parent(parent, path=module_path)
    return None


def pytest_collection_modifyitems(config, items):
    _check_declarations(items)
    _check_engine_marks(items)
    tier = config.stash[TIER]
    if tier == "all":
        return
    keep, drop = [], []
    for item in items:
        is_core = item.get_closest_marker("core") is not None
        (keep if is_core == (tier == "core") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _check_declarations(items) -> None:
    """The module-level marks pytest applied agree with what the ast reader saw (which the host tier uses)."""
    checked = set()
    for item in items:
        module = getattr(item, "module", None)
        if module is None or item.path in checked:
            continue
        checked.add(item.path)
        marks = getattr(module, "pytestmark", [])
        applied = any(
            getattr(m, "name", None) == "core" for m in (marks if isinstance(marks, list | tuple) else [marks])
        )
        if applied != read_module(item.path).core:
            raise pytest.UsageError(
                f"{item.path.name}: write its tier as a literal top-level `pytestmark = pytest.mark.core` "
                "(or a list of pytest.mark entries): the host tier reads it without importing the module"
            )


# The fixtures through which a test reaches the Docker engine (directly or through another fixture).
ENGINE_FIXTURES = frozenset({"docker_client", "base_image"})


def _check_engine_marks(items) -> None:
    """A test that uses the engine carries the `docker` mark: CI runs the core tier's unmarked tests beside
    the host leg's engine tests, and only the mark keeps an engine test out of that part (docs/testing.md)."""
    unmarked = [
        item.nodeid
        for item in items
        if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("docker") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            f"{', '.join(unmarked)}: {'uses' if len(unmarked) == 1 else 'use'} the Docker engine "
            "(docker_client/base_image) without the docker mark: add @pytest.mark.docker"
        )


def pytest_terminal_summary(terminalreporter, config):
    # pytest also makes the neighbours of a file named on the command line: report what was asked for
    asked = [config.invocation_params.dir / arg.split("::")[0] for arg in config.args]
    left_out = {p.name for p in config.stash.get(LEFT_OUT, []) if any(p == a or a in p.parents for a in asked)}
    if left_out:
        terminalreporter.write_line(
            f"host tier: {len(left_out)} core module(s) not collected, by design: {', '.join(sorted(left_out))}"
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a test that skips because the training core is missing fails: it must be marked core."""
    report = yield
    if report.skipped and in_ci() and call.excinfo is not None and call.excinfo.errisinstance(pytest.skip.Exception):
        missing = re.search(r"could not import '([\w.]+)'", str(call.excinfo.value))
        if missing and is_core_name(missing.group(1)):
            report.outcome = "failed"
            report.longrepr = (
                f"{item.nodeid} skipped for want of {missing.group(1)} in CI: a test that needs the training "
                "core is marked core (docs/testing.md), so the host tier deselects it instead"
            )
    return report


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


@pytest.fixture(scope="module")
def blat_db(tmp_path_factory) -> Path:
    """The bundled BLAT_ECOLX scan as a database, once per test module."""
    from runner.data.importer import build_demo_db

    path = tmp_path_factory.mktemp("blat") / "blat.sqlite"
    build_demo_db(path)
    return path


@pytest.fixture(scope="session")
def docker_client():
    """A real Docker engine; in CI (CI=true) its absence fails the test instead of skipping it."""
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # any failure to reach the engine means the same thing here
        if in_ci():
            pytest.fail(f"Docker engine unreachable in CI: {exc}")
        pytest.skip(f"Docker engine unreachable: {exc}")
    return client


# End-to-end fixtures (run user, base image, demo workdir) live in tests/e2e.py.
pytest_plugins = ["tests.e2e"]
