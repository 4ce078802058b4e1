"""`infra data import` / `infra data demo` on real CSV and SQLite files: every bad-data path, atomicity."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from runner.cli.data import app
from runner.data.db import check_database
from runner.data.importer import DEMO_CSV, DEMO_TEMPLATE, build_demo_db, import_csv
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
        ("mutant,DMS_score\nH24,1\n", r"b\.csv:2: mutant 'H24': malformed at 'H24'"),
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
        "import sys, runner.data.importer, runner.cli.data; "
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
    from runner.plan.models import DataSpec

    vs = load_variants(
        DataSpec(db=str(tmp_path / "gb1.sqlite"), where=[{"column": "keep", "op": "=", "value": "True"}])
    )
    assert vs.tokens.shape[1] == 56 and "one_vs_rest" in vs.extra_columns
    assert set(vs.frame["sampled"].dropna().unique()) <= {"train", "test"}


# --- the lab's layout, written by the importer -----------------------------------------------------


def columns(db: Path, table: str) -> list[str]:
    return [r[1] for r in rows(db, f"PRAGMA table_info({table})")]


def test_a_new_database_has_the_labs_layout(tmp_path):
    db = tmp_path / "dms.sqlite"
    import_csv(write(tmp_path / "a.csv", GOOD), db, "A", TEMPLATE)
    assert columns(db, "sources") == ["id", "source_text", "template"]
    assert columns(db, "mutations") == ["id", "mutant", "DMS_score", "DMS_score_bin", "mut_num", "source"]
    assert rows(db, 'SELECT "from", "table", "to" FROM pragma_foreign_key_list(\'mutations\')') == [
        ("source", "sources", "id")
    ]


@pytest.mark.parametrize("layout", ["lab", "infra-0.1"])
def test_import_adds_to_a_lab_or_an_infra_01_database(tmp_path, layout):
    from tests.conftest import make_db

    db = make_db(tmp_path / "old.sqlite", layout=layout)
    key = "source_id" if layout == "infra-0.1" else "source"
    before = columns(db, "mutations")
    result = import_csv(write(tmp_path / "a.csv", GOOD), db, "added", TEMPLATE)
    assert result.rows == 5 and not result.created_db
    assert columns(db, "mutations") == before  # the layout is kept: no column renamed or added
    assert rows(db, f"SELECT id, {key}, mutant, mut_num FROM mutations WHERE id > 6 ORDER BY id") == [
        (7, 2, "H24A", 1),
        (8, 2, "P25A:E26K", 2),
        (9, 2, "", 0),
        (10, 2, "F6*", 1),
        (11, 2, "S2A", 1),
    ]
    assert rows(db, "SELECT id, source_text FROM sources ORDER BY id") == [(1, "BLAT_mini"), (2, "added")]


def test_a_database_of_another_kind_is_refused_in_one_line(tmp_path):
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE mutations (x)").connection.close()
    with pytest.raises(DataError) as info:
        import_csv(write(tmp_path / "a.csv", GOOD), other, "A", TEMPLATE)
    assert str(info.value) == (
        f"--db: {other} has no 'sources' table; import data with 'infra data import'; import into a new file instead"
    )


# --- formats ---------------------------------------------------------------------------------------

PG_HEADER = "mutant,mutated_sequence,DMS_score,DMS_score_bin\n"


def mutated(mutant: str) -> str:
    seq = list(TEMPLATE)
    for part in filter(None, mutant.split(":")):
        seq[int(part[1:-1]) - 1] = part[-1]
    return "".join(seq)


def pg_rows(*mutants: str) -> str:
    return "".join(f"{m},{mutated(m)},{i / 10},{i % 2}\n" for i, m in enumerate(mutants))


def test_tsv_gzip_and_zip_read_the_same(tmp_path):
    import gzip
    import zipfile

    body = GOOD
    plain = write(tmp_path / "a.csv", body)
    tsv = write(tmp_path / "a.tsv", body.replace(",", "\t"))
    gz = tmp_path / "a.csv.gz"
    gz.write_bytes(gzip.compress(body.encode()))
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("folder/a.tsv", body.replace(",", "\t"))
        zf.writestr("__MACOSX/folder/._a.tsv", "junk")
    expected = None
    for i, path in enumerate([plain, tsv, gz, archive]):
        db = tmp_path / f"{i}.sqlite"
        assert import_csv(path, db, "A", TEMPLATE).rows == 5, path
        got = rows(db)
        expected = expected or got
        assert got == expected, path


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "mutant": ["H24A", "P25A:E26K", None],
            "DMS_score": [-0.5, float("inf"), 0.0],
            "DMS_score_bin": [1, None, 1],
            "fold_random_5": [0, 3, 4],
        }
    )
    pq.write_table(table, tmp_path / "a.parquet")
    db = tmp_path / "dms.sqlite"
    result = import_csv(tmp_path / "a.parquet", db, "A", TEMPLATE, extra_columns=["fold_random_5"])
    assert (result.rows, result.wild_type_rows, result.non_finite_scores) == (3, 1, 1)
    assert rows(db, "SELECT mutant, DMS_score, DMS_score_bin, fold_random_5 FROM mutations ORDER BY id") == [
        ("H24A", -0.5, 1, 0),
        ("P25A:E26K", None, None, 3),
        ("", 0.0, 1, 4),
    ]
    with pytest.raises(DataError, match=r"b\.parquet: row 2: mutant 'Q25A': wild type 'Q'"):
        pq.write_table(pa.table({"mutant": ["H24A", "Q25A"], "DMS_score": [1.0, 2.0]}), tmp_path / "b.parquet")
        import_csv(tmp_path / "b.parquet", tmp_path / "other.sqlite", "B", TEMPLATE)


def test_template_comes_from_mutated_sequence_and_is_checked(tmp_path):
    db = tmp_path / "dms.sqlite"
    result = import_csv(write(tmp_path / "pg.csv", PG_HEADER + pg_rows("H24A", "P25A:E26K", "")), db, "PG")
    assert result.template_from == "mutated_sequence" and result.rows == 3
    assert rows(db, "SELECT template FROM sources") == [(TEMPLATE,)]
    # a row whose mutated_sequence is not the template with its mutant applied
    body = PG_HEADER + pg_rows("H24A") + f"P25A,{mutated('P25G')},0.1,1\n"
    with pytest.raises(DataError) as info:
        import_csv(write(tmp_path / "bad.csv", body), tmp_path / "x.sqlite", "PG")
    assert str(info.value) == (
        f"{tmp_path / 'bad.csv'}:3: mutated_sequence is not the template with mutant 'P25A' applied; "
        f"the template was taken from the mutated_sequence of {tmp_path / 'bad.csv'}:2"
    )
    # --template given: checked against every mutated_sequence as well
    with pytest.raises(DataError, match=r"pg2\.csv:2: mutated_sequence is not the template with mutant 'H24A'"):
        import_csv(
            write(tmp_path / "pg2.csv", PG_HEADER + pg_rows("H24A")),
            tmp_path / "y.sqlite",
            "PG",
            "M" + TEMPLATE[1:-1] + "W",
        )
    with pytest.raises(DataError, match=r"missing column\(s\) 'mutated_sequence'; .*; or pass --template"):
        import_csv(write(tmp_path / "plain.csv", GOOD), tmp_path / "z.sqlite", "A")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "dup.csv",
            b"mutant,DMS_score,DMS_score\nH24A,1,2\n",
            "dup.csv: column 'DMS_score' appears 2 times in the header; rename or remove the copies so it is clear "
            "which one to use",
        ),
        (
            "trunc.csv.gz",
            b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03truncated",
            "trunc.csv.gz: the file is damaged or truncated",
        ),
        ("bad.zip", b"PK\x03\x04 not really a zip", "bad.zip: not a readable zip archive"),
        ("latin1.csv", "mutant,DMS_score\nH24A,1\xe9\n".encode("latin-1"), "latin1.csv: not UTF-8 text"),
        ("folder", None, "is a folder; pass one data file"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises((DataError, UsageError)) as info:
        import_csv(path, tmp_path / "dms.sqlite", "A", TEMPLATE)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "dms.sqlite").exists()


def test_a_zip_must_hold_one_table(tmp_path):
    import zipfile

    archive = tmp_path / "two.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.csv", GOOD)
        zf.writestr("b.csv", GOOD)
    with pytest.raises(
        DataError, match=r"two\.zip: the zip holds 2 tables \(a\.csv, b\.csv\); it must hold exactly one"
    ):
        import_csv(archive, tmp_path / "dms.sqlite", "A", TEMPLATE)


def test_a_10000_substitution_mutant_error_is_one_short_line(tmp_path):
    template = "A" * 10_000
    mutant = ":".join(f"A{i}G" for i in range(1, 10_000)) + ":C10000G"  # the last wild-type letter is wrong
    csv_path = write(tmp_path / "long.csv", f"mutant,DMS_score\n{mutant},1\n")
    assert len(mutant) > 68_000
    with pytest.raises(DataError) as info:
        import_csv(csv_path, tmp_path / "dms.sqlite", "A", template)
    message = str(info.value)
    assert len(message) < 400 and "\n" not in message, message
    assert "(68,893 characters)" in message and "wild type 'C' at position 10000" in message


def test_infinite_scores_are_stored_as_missing_and_counted(tmp_path):
    db = tmp_path / "dms.sqlite"
    result = import_csv(
        write(tmp_path / "inf.csv", "mutant,DMS_score\nH24A,1e999\nP25A,-inf\nE26K,0.5\nS2A,\n"),
        db,
        "A",
        TEMPLATE,
        binarize_cutoff=0.0,
    )
    assert (result.non_finite_scores, result.nan_scores) == (2, 1)
    assert rows(db, "SELECT DMS_score, DMS_score_bin FROM mutations ORDER BY id") == [
        (None, None),
        (None, None),
        (0.5, 1),
        (None, None),
    ]


def test_duplicate_mutants_are_kept_and_reported(tmp_path):
    body = "mutant,DMS_score\nH24A,1\nP25A,2\nH24A,3\nP25A,4\nP25A,5\nE26K,6\n"
    result = import_csv(write(tmp_path / "dup.csv", body), tmp_path / "dms.sqlite", "A", TEMPLATE)
    assert result.rows == 6 and result.duplicate_mutants == 2 and set(result.duplicate_examples) == {"H24A", "P25A"}


def test_a_bad_row_after_many_batches_leaves_the_database_unchanged(tmp_path, monkeypatch):
    import runner.data.importer as dataimport

    monkeypatch.setattr(dataimport, "BATCH_ROWS", 7)  # many executemany batches before the bad row
    db = tmp_path / "dms.sqlite"
    import_csv(write(tmp_path / "a.csv", GOOD), db, "A", TEMPLATE)
    before = sha256(db)
    good_rows = "".join(f"{TEMPLATE[p - 1]}{p}{'A' if TEMPLATE[p - 1] != 'A' else 'G'},{p}\n" for p in range(1, 61))
    body = "mutant,DMS_score\n" + good_rows * 3 + "Q25A,1\n"
    with pytest.raises(DataError, match=r"b\.csv:182: mutant 'Q25A'"):
        import_csv(write(tmp_path / "b.csv", body), db, "B", TEMPLATE)
    assert sha256(db) == before
    with pytest.raises(DataError, match=r"b\.csv:182"):
        import_csv(tmp_path / "b.csv", tmp_path / "new.sqlite", "B", TEMPLATE)
    assert not (tmp_path / "new.sqlite").exists() and not list(tmp_path.glob(".new.sqlite.*"))


def test_db_that_is_not_sqlite_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    not_db = write(tmp_path / "notes.txt", "hello, I am text\n")
    csv_path = write(tmp_path / "a.csv", GOOD)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner",
            "data",
            "import",
            str(csv_path),
            "--db",
            str(not_db),
            "--source",
            "A",
            "--template",
            TEMPLATE,
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"infra: error: --db: {not_db} is not a SQLite database; pass a new file name or a mutation database"
    )
    assert not_db.read_text() == "hello, I am text\n"


# --- ProteinGym ------------------------------------------------------------------------------------


@pytest.fixture
def pg_dir(tmp_path):
    from tests.conftest import make_proteingym_folder

    return make_proteingym_folder(tmp_path / "DMS_ProteinGym_substitutions")


def test_proteingym_folder_imports_per_assay_and_resumes(tmp_path, pg_dir):
    from runner.data.proteingym import import_proteingym

    db = tmp_path / "pg.sqlite"
    result = import_proteingym(pg_dir, db).to_dict()
    by_id = {a["assay"]: a for a in result["assays"]}
    assert (result["imported"], result["skipped"], result["failed"]) == (2, 0, 1)
    assert result["ignored_files"] == ["notes.csv"]
    stiffler = by_id["BLAT_ECOLX_Stiffler_2015"]
    assert stiffler["status"] == "imported" and stiffler["rows"] == 600
    assert stiffler["extra_columns"] == ["fold_random_5", "fold_modulo_5", "fold_contiguous_5"]
    assert stiffler["template_from"] == "target_seq of BLAT_ECOLX_Stiffler_2015 in DMS_substitutions.csv"
    assert by_id["BLAT_ECOLX_Firnberg_2014"]["extra_columns"] == []
    deng = by_id["BLAT_ECOLX_Deng_2012"]
    assert deng["status"] == "failed" and deng["error"].startswith(f"{pg_dir / 'BLAT_ECOLX_Deng_2012.csv'}:201: mutant")
    assert rows(
        db,
        "SELECT source_text, count(*) FROM mutations JOIN sources ON sources.id = mutations.source "
        "GROUP BY source_text ORDER BY source_text",
    ) == [("BLAT_ECOLX_Firnberg_2014", 300), ("BLAT_ECOLX_Stiffler_2015", 600)]  # nothing of the failed assay
    assert rows(db, "SELECT count(DISTINCT fold_random_5), count(fold_random_5) FROM mutations") == [(5, 600)]
    before = sha256(db)
    again = import_proteingym(pg_dir, db, ["BLAT_ECOLX_Stiffler_2015"]).to_dict()
    assert [a["status"] for a in again["assays"]] == ["skipped"] and sha256(db) == before
    replaced = import_proteingym(pg_dir, db, ["BLAT_ECOLX_Stiffler_2015"], replace=True).to_dict()
    assert replaced["assays"][0]["replaced"] == 600


def test_proteingym_zip_with_a_separate_reference(tmp_path, pg_dir):
    import zipfile

    from runner.data.proteingym import import_proteingym

    archive = tmp_path / "DMS_ProteinGym_substitutions.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in ("BLAT_ECOLX_Stiffler_2015.csv", "BLAT_ECOLX_Firnberg_2014.csv"):
            zf.write(pg_dir / name, f"DMS_ProteinGym_substitutions/{name}")
    with pytest.raises(UsageError, match=r"has no DMS_substitutions\.csv; pass --reference"):
        import_proteingym(archive, tmp_path / "pg.sqlite")
    result = import_proteingym(archive, tmp_path / "pg.sqlite", reference=pg_dir / "DMS_substitutions.csv")
    assert result.count("imported") == 2 and result.count("failed") == 0
    with pytest.raises(
        UsageError, match=r"--assay: 'BLAT_ECOLX_Stifler_2015' is not in .*did you mean 'BLAT_ECOLX_Stiffler_2015'"
    ):
        import_proteingym(
            archive, tmp_path / "pg.sqlite", ["BLAT_ECOLX_Stifler_2015"], reference=pg_dir / "DMS_substitutions.csv"
        )
    with pytest.raises(DataError, match=r"no file BLAT_ECOLX_Deng_2012\.csv for --assay 'BLAT_ECOLX_Deng_2012'"):
        import_proteingym(
            archive, tmp_path / "pg.sqlite", ["BLAT_ECOLX_Deng_2012"], reference=pg_dir / "DMS_substitutions.csv"
        )


def test_cli_import_proteingym_json_and_exit_code(tmp_path, pg_dir):
    runner = CliRunner()
    db = tmp_path / "pg.sqlite"
    result = runner.invoke(app, ["import-proteingym", str(pg_dir), "--db", str(db), "--json"])
    assert result.exit_code == 2  # one assay failed
    doc = json.loads(result.stdout.strip())
    assert (doc["imported"], doc["failed"]) == (2, 1)
    assert "BLAT_ECOLX_Deng_2012: FAILED:" in result.stderr
    assert "2 assay(s) imported, 0 skipped, 1 failed; 1 file(s) not in the reference ignored" in result.stderr
    ok = runner.invoke(
        app, ["import-proteingym", str(pg_dir), "--db", str(db), "--assay", "BLAT_ECOLX_Stiffler_2015", "--json"]
    )
    assert ok.exit_code == 0 and json.loads(ok.stdout)["skipped"] == 1


@pytest.mark.slow
def test_import_memory_does_not_grow_with_the_file(tmp_path):
    """2 M rows stay under a fixed bound: about 85 MB measured (the SQLite page cache and sorter are
    capped at 32 MB each), where the old importer kept every row in a list (~400 MB here)."""
    import sys

    from tests.helpers import measured

    code = (
        "import sys\n"
        "from runner.data.importer import import_csv\n"
        "print(import_csv(sys.argv[1], sys.argv[2], 'big', sys.argv[3]).rows)\n"
    )
    singles = [f"{TEMPLATE[p - 1]}{p}{a}" for p in range(1, 61) for a in "ACDEFGHIKLMNPQRSTVWY" if a != TEMPLATE[p - 1]]
    with (tmp_path / "big.csv").open("w") as fh:
        fh.write("mutant,DMS_score,DMS_score_bin\n")
        for i in range(2_000_000):
            fh.write(f"{singles[i % len(singles)]},{i * 1e-6},{i & 1}\n")
    # Measured through a small launcher: a process started straight from pytest inherits pytest's peak
    # RSS in its own ru_maxrss (Linux keeps the pre-exec high-water mark).
    status, out, err, rss = measured(
        [sys.executable, "-c", code, str(tmp_path / "big.csv"), str(tmp_path / "big.sqlite"), TEMPLATE]
    )
    assert status == 0, err
    assert int(out.split()[0]) == 2_000_000 and rss < 200, (out, rss)  # peak RSS in MB (the list alone was ~400)
