"""Attacks on `infra data import` and `infra data import-proteingym` with hostile files (issue 23,
finding 5 and the importers' low findings): zip bombs, huge lines, wide rows, duplicate and unsafe
ProteinGym ids, two imports at once. Each test performs the attack on real files and shows a
one-line error with the documented exit code (2) instead of a MemoryError, a silent choice or a
wrong report. Host tier: standard library and the importer only."""

from __future__ import annotations

import csv
import gzip
import resource
import sqlite3
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from runner.data import tables
from tests.helpers import REPO, cli

TEMPLATE = "MSIQHFRVALIPFFAAFCLPVFAHPETLVKVKDAEDQLGARVGYIELDLNSGKILESFRP"
MIB = 1 << 20
CHUNK = b"A" * MIB


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The command failed with exit 2 and exactly one `infra: error:` line holding every fragment."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("infra: error: "), lines[:5]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def import_args(path: Path, db: Path, *extra: str) -> list[str]:
    return ["data", "import", str(path), "--db", str(db), "--source", "A", "--template", TEMPLATE, *extra]


def stream_zip_member(archive: Path, member: str, head: bytes, mib: int, tail: bytes = b"") -> None:
    """A zip with one deflated member: `head`, `mib` MiB of 'A' (no newline) and `tail`, written chunk by
    chunk so the test never holds the member in memory (level 9: ~1,000 to 1 on a run of one byte)."""
    with (
        zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf,
        zf.open(member, "w", force_zip64=True) as out,
    ):
        out.write(head)
        for _ in range(mib):
            out.write(CHUNK)
        out.write(tail)


def limit_memory(limit: int):
    def apply() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def import_under_memory_limit(path: Path, db: Path) -> subprocess.CompletedProcess:
    """`infra data import` of `path` in a child process whose address space is capped at 1 GiB: what
    an unbounded reader would hold of a bomb ends it with MemoryError, not the machine."""
    return subprocess.run(
        [sys.executable, "-m", "runner", *import_args(path, db)],
        capture_output=True,
        text=True,
        cwd=REPO,
        preexec_fn=limit_memory(1 << 30),
        timeout=300,
    )


# --- finding 5: zip bombs and huge lines --------------------------------------------------------------


def test_a_zip_bomb_whose_header_line_is_1_5_gib_is_refused_in_one_line_under_a_1_gib_memory_limit(tmp_path):
    """The issue's attack, scaled to 1.5 GiB: a ~1.5 MB zip whose first line never ends. Under a
    1 GiB address-space limit the old importer died with MemoryError in readline(); now the
    member's declared sizes refuse it before a byte is decompressed."""
    bomb = tmp_path / "bomb.zip"
    stream_zip_member(bomb, "bomb.csv", b"mutant,DMS_score,", 1536)
    assert bomb.stat().st_size < 4 * MIB
    result = import_under_memory_limit(bomb, tmp_path / "db.sqlite")
    one_line_error(result, f"{bomb}:bomb.csv", "500 times", "limit")
    assert not (tmp_path / "db.sqlite").exists()


def test_a_gzip_inside_a_zip_is_stopped_by_counting_the_bytes_read_under_a_memory_limit(tmp_path):
    """A zip member `x.csv.gz` is incompressible to zip (its declared sizes look honest), but the gzip
    inside inflates a 1 GiB header line: only counting what is really read can stop it."""
    inner = tmp_path / "x.csv.gz"
    with gzip.open(inner, "wb", compresslevel=9) as gz:
        gz.write(b"mutant,DMS_score,")
        for _ in range(1024):
            gz.write(CHUNK)
    bomb = tmp_path / "inner.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.write(inner, "x.csv.gz")
    info = zipfile.ZipFile(bomb).getinfo("x.csv.gz")
    assert info.file_size == info.compress_size  # nothing for a header check to see
    result = import_under_memory_limit(bomb, tmp_path / "db.sqlite")
    # the row limit (1 MiB) comes first: no line of this file is ever held whole
    one_line_error(result, f"{bomb}:x.csv.gz:1:", "1 MiB", "limit")


@pytest.mark.parametrize(("value_mib", "rows", "limit"), [(2, 10, "MAX_ROW_CHARS"), (1, 20_000, "MAX_BATCH_BYTES")])
def test_a_parquet_dictionary_bomb_is_refused_before_it_expands_under_a_memory_limit(tmp_path, value_mib, rows, limit):
    """A few-KB Parquet file whose text column is one long value repeated through a dictionary: it
    declares its encoded size only, and read plainly one batch of it expands to gigabytes (review of
    issue 23). The dictionary is measured first: a value over the row limit, or a batch whose values
    would exceed the batch limit, is refused before anything is materialised."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    bomb = tmp_path / "bomb.parquet"
    value = "A" * (value_mib * MIB - 1)
    column = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), pa.array([value]))
    table = pa.table({"mutant": column, "DMS_score": pa.array([0.5] * rows)})
    pq.write_table(table, bomb, use_dictionary=True, compression="zstd")
    assert bomb.stat().st_size < 256 * 1024
    result = import_under_memory_limit(bomb, tmp_path / "db.sqlite")
    one_line_error(result, str(bomb), f"({limit})")
    assert not (tmp_path / "db.sqlite").exists()


def test_a_gzip_of_blank_lines_is_stopped_by_its_compression_ratio(tmp_path, monkeypatch):
    """Every line is short, so only the ratio gives the bomb away: 8 MiB of newlines from a ~8 KB .gz.
    The floor below which ratios are not judged is lowered to 1 MiB so the test stays small."""
    monkeypatch.setattr(tables, "RATIO_FLOOR_BYTES", MIB)
    bomb = tmp_path / "blank.csv.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as gz:
        gz.write(b"mutant,DMS_score\n")
        for _ in range(8):
            gz.write(b"\n" * MIB)
        gz.write(b"H24A,0.5\n")
    one_line_error(cli(*import_args(bomb, tmp_path / "db.sqlite")), str(bomb), "500 times", "limit")
    assert not (tmp_path / "db.sqlite").exists()


def test_a_zip_member_declaring_a_high_ratio_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "RATIO_FLOOR_BYTES", MIB)
    archive = tmp_path / "ratio.zip"
    stream_zip_member(archive, "t.csv", b"mutant,DMS_score,notes\nH24A,0.5,", 8, b"\n")
    one_line_error(cli(*import_args(archive, tmp_path / "db.sqlite")), f"{archive}:t.csv", "500 times")


def test_a_compressed_table_larger_than_the_decompressed_limit_is_refused(tmp_path, monkeypatch):
    """Real rows, ordinary ratio (~5): only the absolute cap applies; lowered to 1 MiB for the test."""
    monkeypatch.setattr(tables, "MAX_DECOMPRESSED_BYTES", MIB)
    big = tmp_path / "big.csv.gz"
    singles = [f"{TEMPLATE[p - 1]}{p}{a}" for p in range(1, 61) for a in "ACDEFGHIKLMNPQRSTVWY" if a != TEMPLATE[p - 1]]
    with gzip.open(big, "wt") as gz:
        gz.write("mutant,DMS_score\n")
        for i in range(200_000):
            gz.write(f"{singles[i % len(singles)]},{i * 1.0001e-3:.6f}\n")
    one_line_error(cli(*import_args(big, tmp_path / "db.sqlite")), str(big), "more than 1 MiB", "limit")
    assert not (tmp_path / "db.sqlite").exists()


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"H24A,0.5," + CHUNK * 2 + b"\n", id="one-2-MiB-line"),
        pytest.param(b'H24A,0.5,"' + (b"x" * 1000 + b"\n") * 2100 + b'"\n', id="a-quoted-field-over-2100-lines"),
    ],
)
def test_a_row_longer_than_the_limit_is_refused_naming_line_and_limit(tmp_path, body):
    """The old importer read either row whole (up to csv's 16 MB field limit) and imported it."""
    table = tmp_path / "long.csv"
    table.write_bytes(b"mutant,DMS_score,notes\nP25A,0.1,ok\n" + body + b"S2A,0.2,ok\n")
    db = tmp_path / "db.sqlite"
    one_line_error(cli(*import_args(table, db)), f"{table}:3", "1 MiB", "limit")
    assert not db.exists()


def test_a_header_with_more_fields_than_the_limit_is_refused(tmp_path):
    """20,000 columns: the old importer accepted it (and every row's 20,000 strings)."""
    table = tmp_path / "wide.csv"
    names = ["mutant", "DMS_score", *(f"c{i}" for i in range(19_998))]
    table.write_text(",".join(names) + "\n" + "H24A,0.5" + ",1" * 19_998 + "\n")
    one_line_error(cli(*import_args(table, tmp_path / "db.sqlite")), f"{table}:1:", "20,000 fields", "10,000")


def test_a_row_with_more_fields_than_the_limit_is_refused_naming_the_limit(tmp_path):
    table = tmp_path / "wide-row.csv"
    table.write_text("mutant,DMS_score\nH24A,0.5\nP25A,0.1" + ",1" * 50_000 + "\n")
    one_line_error(cli(*import_args(table, tmp_path / "db.sqlite")), f"{table}:3:", "50,002 fields", "10,000")


def test_real_data_is_far_inside_the_limits():
    """The limits' reasons hold for the shared real data: the longest ProteinGym target fits a row many
    times over and the real gzipped tables compress far below the ratio limit."""
    reference = Path("/work/shared/data/dms/raw/proteingym_reference/DMS_substitutions.csv")
    gb1 = Path("/work/shared/data/dms/raw/gb1_wu2016/four_mutations_full_data.csv.gz")
    if not reference.is_file() or not gb1.is_file():
        pytest.skip("the shared real DMS data is not present")
    with reference.open(newline="", encoding="utf-8") as fh:
        longest = max(len(r["target_seq"]) for r in csv.DictReader(fh))
    assert longest * 100 < tables.MAX_ROW_CHARS  # a row carries the sequence once (plus its mutant)
    with gzip.open(gb1) as fh:
        inflated = sum(len(chunk) for chunk in iter(lambda: fh.read(MIB), b""))
    assert inflated / gb1.stat().st_size < tables.MAX_RATIO / 10


# --- ProteinGym: duplicate and unsafe ids --------------------------------------------------------------


@pytest.fixture
def pg_dir(tmp_path):
    from tests.conftest import make_proteingym_folder

    return make_proteingym_folder(tmp_path / "pg")


def edit_reference(pg_dir: Path, change) -> Path:
    """Rewrite the folder's DMS_substitutions.csv with `change(rows)` applied to its list of row dicts."""
    reference = pg_dir / "DMS_substitutions.csv"
    with reference.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header, rows = reader.fieldnames, list(reader)
    rows = change(rows)
    with reference.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return reference


def sources(db: Path) -> list[str]:
    if not db.exists():
        return []
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute("SELECT source_text FROM sources ORDER BY source_text")]
    finally:
        conn.close()


def test_a_duplicate_dms_id_is_refused_naming_it_and_both_lines(tmp_path, pg_dir):
    """The second row of an id used to win silently, with its own target_seq."""

    def twice(rows):
        copy = dict(rows[0], target_seq="M" * 50)
        return [*rows, copy]

    reference = edit_reference(pg_dir, twice)
    dms_id = "BLAT_ECOLX_Deng_2012"  # the reference is sorted: the first row
    db = tmp_path / "pg.sqlite"
    one_line_error(
        cli("data", "import-proteingym", str(pg_dir), "--db", str(db)), f"{reference}:5:", repr(dms_id), "line 2"
    )
    assert sources(db) == []


def test_two_files_of_the_same_name_are_refused_naming_both(tmp_path, pg_dir):
    """`a/X.csv` and `b/X.csv` in one folder: which one is the assay is not guessed (the first used to win)."""
    (pg_dir / "copy").mkdir()
    (pg_dir / "copy" / "BLAT_ECOLX_Stiffler_2015.csv").write_text("mutant,DMS_score\nH24A,0.5\n")
    result = cli("data", "import-proteingym", str(pg_dir), "--db", str(tmp_path / "pg.sqlite"))
    assert result.returncode == 2
    line = next(x for x in result.stderr.splitlines() if "BLAT_ECOLX_Stiffler_2015" in x)
    assert str(pg_dir / "BLAT_ECOLX_Stiffler_2015.csv") in line and str(pg_dir / "copy") in line, line
    assert "BLAT_ECOLX_Stiffler_2015" not in sources(tmp_path / "pg.sqlite")


@pytest.mark.parametrize("bad", ["../../escape", "a/b", "x\x1b[31mRED", "tab\there", "..", ".hidden"])
def test_an_unsafe_dms_id_is_refused_naming_the_allowed_characters(tmp_path, pg_dir, bad):
    def rename(rows):
        rows[0]["DMS_id"] = bad
        return rows

    reference = edit_reference(pg_dir, rename)
    db = tmp_path / "pg.sqlite"
    line = one_line_error(
        cli("data", "import-proteingym", str(pg_dir), "--db", str(db)), f"{reference}:2:", "letters, digits"
    )
    assert "\x1b" not in line
    assert sources(db) == []


@pytest.mark.parametrize("bad", ["../x", "a/b", "red\x1b[31m", "new\nline", "..", "-rf"])
def test_an_unsafe_source_name_is_refused(tmp_path, bad):
    table = tmp_path / "t.csv"
    table.write_text("mutant,DMS_score\nH24A,0.5\n")
    args = ["data", "import", str(table), "--db", str(tmp_path / "db.sqlite"), "--template", TEMPLATE]
    line = one_line_error(cli(*args, f"--source={bad}"), "--source", "letters, digits")
    assert "\x1b" not in line
    assert not (tmp_path / "db.sqlite").exists()


def test_a_bomb_among_proteingym_assays_fails_that_assay_only(tmp_path, pg_dir):
    """A 100 MiB one-line assay deflated to ~100 KB inside the release zip: refused by its declared
    ratio (real limits), reported as that assay's one-line failure; the real assays are imported."""
    archive = tmp_path / "DMS_ProteinGym_substitutions.zip"
    stream_zip_member(archive, "BLAT_ECOLX_Deng_2012.csv", b"mutant,DMS_score,", 100)
    with zipfile.ZipFile(archive, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in ("DMS_substitutions.csv", "BLAT_ECOLX_Stiffler_2015.csv", "BLAT_ECOLX_Firnberg_2014.csv"):
            zf.write(pg_dir / name, name)
    db = tmp_path / "pg.sqlite"
    result = cli("data", "import-proteingym", str(archive), "--db", str(db))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    failed = [x for x in result.stderr.splitlines() if "FAILED" in x]
    assert len(failed) == 1 and failed[0].startswith("BLAT_ECOLX_Deng_2012: FAILED: "), failed
    assert "500 times" in failed[0] and "zip bomb" in failed[0], failed[0]
    assert sources(db) == ["BLAT_ECOLX_Firnberg_2014", "BLAT_ECOLX_Stiffler_2015"]


# --- two imports at once ---------------------------------------------------------------------------


def test_a_second_concurrent_import_is_refused_by_the_lock_and_the_first_completes(tmp_path, pg_dir):
    """The first import is held inside its progress callback (an Event the test controls) while it
    holds the database; the second used to report every assay FAILED although the data was there."""
    from runner.data.proteingym import import_proteingym

    db = tmp_path / "pg.sqlite"
    good = ["BLAT_ECOLX_Firnberg_2014", "BLAT_ECOLX_Stiffler_2015"]
    inside, release = threading.Event(), threading.Event()
    outcome: dict = {}

    def hold(entry: dict) -> None:
        inside.set()
        assert release.wait(120), "the test never released the first import"

    def first() -> None:
        try:
            outcome["result"] = import_proteingym(pg_dir, db, good, on_assay=hold)
        except BaseException as exc:  # reported by the main thread's assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert inside.wait(120), outcome
        args = ["data", "import-proteingym", str(pg_dir), "--db", str(db), *(f"--assay={a}" for a in good)]
        second = cli(*args)
        line = one_line_error(second, str(db), "another import")
        assert "FAILED" not in second.stderr, line
    finally:
        release.set()
        thread.join(120)
    assert "error" not in outcome, outcome
    assert outcome["result"].count("imported") == 2
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert "2 skipped, 0 failed" in again.stderr
    assert sources(db) == sorted(good)
