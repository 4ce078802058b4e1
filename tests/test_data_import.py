"""`infra data import` / `infra data demo` on real CSV and SQLite files: every bad-data path, atomicity."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from runner.cli.data import app
from runner.dataimport import DEMO_CSV, DEMO_TEMPLATE, build_demo_db, import_csv
from runner.dbschema import check_database
from runner.errors import DataError, UsageError

TEMPLATE = "MSIQHFRVALIPFFAAFCLPVFAHPETLVKVKDAEDQLGARVGYIELDLNSGKILESFRP"
GOOD = "mutant,DMS_score,DMS_score_bin\nH24A,-0.5,1\nP25A:E26K,-2.5,0\n,0.0,1\nF6*,NaN,\nS2A,,\n"


def write(path: Path, text: str, bom: bool = False) -> Path:
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return path


def rows(db: Path, sql: str = "SELECT mutant, mut_num, DMS_score, DMS_score_bin FROM mutations ORDER BY id"):
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("bom", [False, True])
def test_import_good_csv_with_and_without_bom(tmp_path, bom):
    csv_path = write(tmp_path / "a.csv", GOOD.replace("\n", "\r\n"), bom=bom)
    db = tmp_path / "dms.sqlite"
    result = import_csv(csv_path, db, "BLAT", TEMPLATE, description="test")
    assert check_database(db) is None
    assert (result.rows, result.wild_type_rows, result.nan_scores, result.max_mut_num, result.created_db) == (
        5,
        1,
        2,
        2,
        True,
    )
    assert rows(db) == [
        ("H24A", 1, -0.5, 1),
        ("P25A:E26K", 2, -2.5, 0),
        ("", 0, 0.0, 1),
        ("F6*", 1, None, None),
        ("S2A", 1, None, None),
    ]
    assert rows(db, "SELECT source_text, template, description FROM sources") == [("BLAT", TEMPLATE, "test")]
    assert oct(db.stat().st_mode & 0o777) != oct(0o600)  # not the temp file's private mode


def test_score_column_cutoff_and_extra_columns(tmp_path):
    csv_path = write(tmp_path / "b.csv", "mutant,2500,fold,note\nH24A,-0.5,1,x\nP25A,-2.5,2,\n")
    db = tmp_path / "dms.sqlite"
    import_csv(
        csv_path, db, "B", TEMPLATE, score_column="2500", binarize_cutoff=-1.1595, extra_columns=["fold", "note"]
    )
    assert rows(db, "SELECT DMS_score, DMS_score_bin, fold, note FROM mutations") == [
        (-0.5, 1, 1, "x"),
        (-2.5, 0, 2, None),
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "mutant,DMS_score\nH24A,1\nQ25A,1\n",
            r"b\.csv:3: mutant 'Q25A': wild type 'Q' at position 25 does not match the template's 'P'",
        ),
        ("mutant,DMS_score\nH99A,1\n", r"b\.csv:2: mutant 'H99A': position 99 is outside the template \(length 60\)"),
        ("mutant,DMS_score\nH0A,1\n", r"position 0 is outside"),
        ("mutant,DMS_score\nH24,1\n", r"b\.csv:2: mutant 'H24' is malformed at 'H24'"),
        ("mutant,DMS_score\nH24A;P25A,1\n", r"malformed"),
        ("mutant,DMS_score\nH24A:,1\n", r"malformed at ''"),
        ("mutant,DMS_score\nH24A:H24C,1\n", r"mutates position 24 twice"),
        ("mutant,DMS_score\nH24A,abc\n", r"b\.csv:2: column 'DMS_score' value 'abc' is not a number"),
        ("mutant,DMS_score,DMS_score_bin\nH24A,1,2\n", r"column 'DMS_score_bin' value '2' must be 0 or 1"),
        ("mutant,score\nH24A,1\n", r"missing column\(s\) 'DMS_score'; the header has: mutant, score"),
        ("variant,DMS_score\nH24A,1\n", r"missing column\(s\) 'mutant'"),
        ("mutant,DMS_score\n", r"no data rows"),
        ("", r"the file is empty"),
        ("mutant,DMS_score\nH24A,1,extra\n", r"b\.csv:2: the row has more fields \(3\) than the header \(2\)"),
    ],
)
def test_bad_csv_is_rejected_and_nothing_is_written(tmp_path, body, message):
    csv_path = write(tmp_path / "b.csv", body)
    db = tmp_path / "dms.sqlite"
    with pytest.raises(DataError, match=message):
        import_csv(csv_path, db, "B", TEMPLATE)
    assert not db.exists() and list(tmp_path.iterdir()) == [csv_path]


def test_failed_import_leaves_existing_db_untouched(tmp_path):
    db = tmp_path / "dms.sqlite"
    import_csv(write(tmp_path / "a.csv", GOOD), db, "A", TEMPLATE)
    before = sha256(db)
    with pytest.raises(DataError, match="wild type"):
        import_csv(write(tmp_path / "b.csv", "mutant,DMS_score\nH24A,1\nQ25A,1\n"), db, "B", TEMPLATE)
    assert sha256(db) == before


def test_same_source_twice_needs_replace(tmp_path):
    db = tmp_path / "dms.sqlite"
    csv_path = write(tmp_path / "a.csv", GOOD)
    import_csv(csv_path, db, "A", TEMPLATE)
    before = sha256(db)
    with pytest.raises(DataError, match=r"--source: 'A' is already in .*pass --replace"):
        import_csv(csv_path, db, "A", TEMPLATE)
    assert sha256(db) == before
    result = import_csv(write(tmp_path / "c.csv", "mutant,DMS_score\nH24A,9\n"), db, "A", TEMPLATE, replace=True)
    assert result.replaced == 5 and rows(db) == [("H24A", 1, 9.0, None)]
    import_csv(csv_path, db, "other", TEMPLATE)
    assert rows(db, "SELECT count(*) FROM sources")[0][0] == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": ""}, "--source"),
        ({"template": "MKV1"}, "--template"),
        ({"extra_columns": ["bad name"]}, "--extra-columns: 'bad name'"),
        ({"extra_columns": ['x"; DROP TABLE sources; --']}, "--extra-columns"),
        ({"extra_columns": ["mutant"]}, "standard column"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    args = {"source": "A", "template": TEMPLATE, **kwargs}
    with pytest.raises(UsageError, match=message):
        import_csv(
            write(tmp_path / "a.csv", GOOD), tmp_path / "dms.sqlite", args.pop("source"), args.pop("template"), **args
        )


def test_demo_db(tmp_path):
    assert DEMO_CSV.stat().st_size < 1_000_000
    result = build_demo_db(tmp_path / "demo.sqlite")
    assert result.rows == 4997 and result.nan_scores == 0 and len(DEMO_TEMPLATE) == 286
    assert rows(tmp_path / "demo.sqlite", "SELECT sum(DMS_score_bin), count(*) FROM mutations") == [(2499, 4997)]
    with pytest.raises(DataError, match="already has the demo data .*--replace"):
        build_demo_db(tmp_path / "demo.sqlite")
    assert build_demo_db(tmp_path / "demo.sqlite", replace=True).replaced == 4997


def test_bundled_csv_matches_the_raw_data():
    raw = (
        Path(__file__).resolve().parents[2]
        / "shared/data/dms/raw/blat_ecolx_stiffler2015/BLAT_ECOLX_Ranganathan2015.csv"
    )
    if not raw.exists():
        pytest.skip(f"{raw} not present")
    import csv

    with raw.open(encoding="utf-8-sig", newline="") as f:
        expected = [(r["mutant"], float(r["2500"])) for r in csv.DictReader(f)]
    with DEMO_CSV.open(newline="") as f:
        got = [(r["mutant"], float(r["DMS_score"])) for r in csv.DictReader(f)]
    assert got == expected


def test_cli_import_and_demo_json(tmp_path):
    runner = CliRunner()
    db = tmp_path / "dms.sqlite"
    csv_path = write(tmp_path / "a.csv", GOOD)
    result = runner.invoke(
        app, ["import", str(csv_path), "--db", str(db), "--source", "A", "--template", TEMPLATE, "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout.strip().splitlines()[0])
    assert doc["rows"] == 5 and doc["source"] == "A" and doc["created_db"] is True
    result = runner.invoke(app, ["import", str(csv_path), "--db", str(db), "--source", "A", "--template", TEMPLATE])
    assert isinstance(result.exception, DataError) and "--replace" in str(result.exception)
    result = runner.invoke(app, ["demo", "--db", str(tmp_path / "demo.sqlite"), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout.strip().splitlines()[0])["rows"] == 4997


def test_cli_commands_have_help_with_an_example():
    runner = CliRunner()
    for command in ("import", "demo"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Example: infra data " + command in " ".join(result.output.split())


def test_host_side_import_needs_no_numpy_or_pandas():
    import subprocess
    import sys

    code = (
        "import sys, runner.dataimport, runner.cli.data; "
        "bad = [m for m in ('numpy', 'pandas', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.slow
def test_gb1_database_from_the_raw_data(tmp_path):
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "make_gb1_db.py"
    spec = importlib.util.spec_from_file_location("make_gb1_db", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not (module.RAW / "four_mutations_full_data.csv.gz").exists():
        pytest.skip(f"{module.RAW} not present")
    assert module.variants_to_mutant("VDGV") == "" and module.variants_to_mutant("ADGC") == "V39A:V54C"
    result = module.build(tmp_path / "gb1.sqlite")
    assert (result.rows, result.wild_type_rows, result.max_mut_num) == (149_361, 1, 4)
    from runner.core.data import load_variants

    vs = load_variants(
        {"data": {"db": str(tmp_path / "gb1.sqlite"), "where": [{"column": "keep", "op": "=", "value": "True"}]}}
    )
    assert vs.tokens.shape[1] == 56 and "one_vs_rest" in vs.extra_columns
    assert set(vs.frame["sampled"].dropna().unique()) <= {"train", "test"}
