"""Import ProteinGym-style CSVs into the mutation database (docs/data.md); standard library only.

A CSV has a `mutant` column (`A23G:L45P`, 1-based, `*` = stop, empty = wild type), a score column
(`DMS_score` by default) and optionally a binary column (`DMS_score_bin`, or computed with a
cutoff). Every mutant is checked against the template before anything is written; an import is
all or nothing: a new database is built in a temporary file and renamed into place, an existing
one is changed inside one transaction.

Example::

    import_csv("BLAT.csv", "dms.sqlite", source="BLAT_ECOLX", template="MSIQHF...", score_column="2500",
               binarize_cutoff=-1.1595)
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import sqlite3
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from runner.data.db import SCHEMA_SQL
from runner.errors import DataError, UsageError

log = logging.getLogger(__name__)

SUBSTITUTION = re.compile(r"([A-Za-z])([0-9]{1,9})([A-Za-z*])")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
TEMPLATE = re.compile(r"[A-Za-z*]+")
WILD_TYPE_SPELLINGS = {"", "_wt", "wt", "WT", "wildtype", "wild_type"}
MISSING_VALUES = {"", "nan", "NaN", "NAN", "NA", "N/A", "na", "null", "NULL", "None"}
RESERVED_COLUMNS = {"id", "source_id", "mutant", "mut_num", "DMS_score", "DMS_score_bin"}

DEMO_CSV = Path(__file__).resolve().parent / "blat_ecolx.csv"
DEMO_SOURCE = "BLAT_ECOLX_Stiffler_2015"
DEMO_DESCRIPTION = (
    "TEM-1 beta-lactamase single mutants, ampicillin 2500 ug/mL (Stiffler et al. 2015, Cell); "
    "DMS_score_bin cutoff -1.159498916 (ProteinGym)"
)
# target_seq of BLAT_ECOLX_Stiffler_2015 in ProteinGym's DMS_substitutions.csv (UniProt P62593)
DEMO_TEMPLATE = (
    "MSIQHFRVALIPFFAAFCLPVFAHPETLVKVKDAEDQLGARVGYIELDLNSGKILESFRPEERFPMMSTFKVLLCGAVLSRVDAGQEQLGRRIHYSQNDLVEYSPVTEKHL"
    "TDGMTVRELCSAAITMSDNTAANLLLTTIGGPKELTAFLHNMGDHVTRLDRWEPELNEAIPNDERDTTMPAAMATTLRKLLTGELLTLASRQQLIDWMEADKVAGPLLRS"
    "ALPAGWFIADKSGAGERGSRGIIAALGPDGKPSRIVVIYTTGSQATMDERNRQIAEIGASLIKHW"
)
DEMO_CUTOFF = -1.159498916  # ProteinGym DMS_binarization_cutoff; used to make the bundled DMS_score_bin


@dataclass(frozen=True)
class ImportResult:
    """What an import wrote."""

    db: str
    source: str
    rows: int
    wild_type_rows: int
    nan_scores: int
    max_mut_num: int
    replaced: int  # rows of an earlier import of the same source that were removed
    created_db: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def parse_mutant(mutant: str, template: str, where: str) -> int:
    """Check one mutant string against the template and return its number of substitutions.

    `where` (e.g. "data.csv:12") prefixes the DataError for a malformed mutant, a position outside
    the template, or a wild-type letter that differs from the template.
    """
    if mutant in WILD_TYPE_SPELLINGS:
        return 0
    seen: set[int] = set()
    parts = mutant.split(":")
    for part in parts:
        match = SUBSTITUTION.fullmatch(part)
        if match is None:
            raise DataError(
                f"{where}: mutant {mutant!r} is malformed at {part!r}; expected e.g. 'A23G' or 'A23G:L45P' (1-based)"
            )
        wt, pos_text, _ = match.groups()
        pos = int(pos_text)
        if not 1 <= pos <= len(template):
            raise DataError(
                f"{where}: mutant {mutant!r}: position {pos} is outside the template (length {len(template)})"
            )
        if template[pos - 1].upper() != wt.upper():
            raise DataError(
                f"{where}: mutant {mutant!r}: wild type {wt!r} at position {pos} does not match the template's "
                f"{template[pos - 1]!r}; check --template and that positions are 1-based"
            )
        if pos in seen:
            raise DataError(f"{where}: mutant {mutant!r} mutates position {pos} twice")
        seen.add(pos)
    return len(parts)


def _parse_float(text: str | None, where: str, column: str) -> float | None:
    if text is None or text.strip() in MISSING_VALUES:
        return None
    try:
        value = float(text)
    except ValueError:
        raise DataError(
            f"{where}: column {column!r} value {text!r} is not a number (empty or NaN mean missing)"
        ) from None
    return None if math.isnan(value) else value


def _parse_bin(text: str | None, where: str, column: str) -> int | None:
    value = _parse_float(text, where, column)
    if value is None:
        return None
    if text.strip().lower() in ("true", "false"):
        return int(text.strip().lower() == "true")
    if value not in (0.0, 1.0):
        raise DataError(f"{where}: column {column!r} value {text!r} must be 0 or 1")
    return int(value)


def _extra_value(text: str | None) -> str | None:
    return None if text is None or text == "" else text


def _read_rows(
    csv_path: Path,
    template: str,
    score_column: str,
    bin_column: str | None,
    binarize_cutoff: float | None,
    extra_columns: Sequence[str],
) -> tuple[list[tuple], dict[str, int]]:
    """Parse and check every row; nothing is written until the whole file is known to be good."""
    try:
        handle = csv_path.open(newline="", encoding="utf-8-sig")  # utf-8-sig strips a byte-order mark
    except OSError as exc:
        raise DataError(f"{csv_path}: cannot be read: {exc.strerror}") from None
    with handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        if not header:
            raise DataError(f"{csv_path}: the file is empty; expected a header with 'mutant' and {score_column!r}")
        required = ["mutant", score_column, *extra_columns]
        if bin_column and binarize_cutoff is None and bin_column != "DMS_score_bin":
            required.append(bin_column)
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(
                f"{csv_path}: missing column(s) {', '.join(map(repr, missing))}; the header has: {', '.join(header)}"
            )
        use_bin = binarize_cutoff is None and bool(bin_column) and bin_column in header
        rows: list[tuple] = []
        counts = {"wild_type_rows": 0, "nan_scores": 0, "max_mut_num": 0}
        try:
            for record in reader:
                where = f"{csv_path}:{reader.line_num}"
                if None in record:
                    raise DataError(f"{where}: the row has more fields than the header")
                mutant = (record["mutant"] or "").strip()
                mut_num = parse_mutant(mutant, template, where)
                if mut_num == 0:
                    mutant = ""
                    counts["wild_type_rows"] += 1
                counts["max_mut_num"] = max(counts["max_mut_num"], mut_num)
                score = _parse_float(record[score_column], where, score_column)
                if score is None:
                    counts["nan_scores"] += 1
                if binarize_cutoff is not None:
                    score_bin = None if score is None else int(score >= binarize_cutoff)
                elif use_bin:
                    score_bin = _parse_bin(record[bin_column], where, bin_column)
                else:
                    score_bin = None
                extras = tuple(_extra_value(record[c]) for c in extra_columns)
                rows.append((mutant, mut_num, score, score_bin, *extras))
        except csv.Error as exc:
            raise DataError(f"{csv_path}:{reader.line_num}: not valid CSV: {exc}") from None
        except UnicodeDecodeError:
            raise DataError(f"{csv_path}: not UTF-8 text; save the CSV as UTF-8") from None
    if not rows:
        raise DataError(f"{csv_path}: no data rows after the header")
    return rows, counts


def _check_arguments(source: str, template: str, extra_columns: Sequence[str], score_column: str) -> str:
    if not source or source != source.strip():
        raise UsageError(f"--source: {source!r} must be a non-empty name without surrounding spaces")
    template = template.strip()
    if not TEMPLATE.fullmatch(template):
        raise UsageError("--template: must be a protein sequence of one-letter codes (A-Z, '*'), e.g. 'MSIQHF...'")
    for column in extra_columns:
        if not IDENTIFIER.fullmatch(column):
            raise UsageError(f"--extra-columns: {column!r} is not a valid column name (letters, digits, '_')")
        if column in RESERVED_COLUMNS:
            raise UsageError(f"--extra-columns: {column!r} is a standard column of the mutations table; leave it out")
        if column == score_column:
            raise UsageError(f"--extra-columns: {column!r} is already the score column")
    if len(set(extra_columns)) != len(extra_columns):
        raise UsageError("--extra-columns: a column is listed twice")
    return template.upper()


def import_csv(
    csv_path: str | Path,
    db_path: str | Path,
    source: str,
    template: str,
    *,
    description: str = "",
    score_column: str = "DMS_score",
    bin_column: str | None = "DMS_score_bin",
    binarize_cutoff: float | None = None,
    extra_columns: Iterable[str] = (),
    replace: bool = False,
) -> ImportResult:
    """Import one CSV as source `source` into `db_path` (created with the schema when absent).

    DMS_score comes from `score_column`; DMS_score_bin from `bin_column` when the CSV has it, or is
    `score >= binarize_cutoff` when a cutoff is given, else NULL. `extra_columns` are copied into
    same-named `mutations` columns (added when missing; NULL for other sources). Importing a source
    that already exists is a DataError unless `replace`, which swaps its rows and template.
    """
    csv_path, db_path = Path(csv_path), Path(db_path)
    extra_columns = list(extra_columns)
    template = _check_arguments(source, template, extra_columns, score_column)
    rows, counts = _read_rows(csv_path, template, score_column, bin_column, binarize_cutoff, extra_columns)
    created = not db_path.exists()
    if created:
        if not db_path.parent.is_dir():
            raise DataError(f"--db: folder {db_path.parent} does not exist; create it first")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{db_path.name}.", suffix=".tmp", dir=db_path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the database should get normal permissions
        try:
            replaced = _write(tmp, source, template, description, extra_columns, rows, replace)
            os.replace(tmp, db_path)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        replaced = _write(db_path, source, template, description, extra_columns, rows, replace)
    result = ImportResult(
        str(db_path),
        source,
        len(rows),
        counts["wild_type_rows"],
        counts["nan_scores"],
        counts["max_mut_num"],
        replaced,
        created,
    )
    log.info("imported %d rows of %s into %s", len(rows), source, db_path)
    return result


def _write(
    db_path: Path,
    source: str,
    template: str,
    description: str,
    extra_columns: list[str],
    rows: list[tuple],
    replace: bool,
) -> int:
    """Write one source inside one transaction; returns how many earlier rows were replaced."""
    try:
        conn = sqlite3.connect(db_path, isolation_level=None, timeout=30)
    except sqlite3.Error as exc:
        raise DataError(f"--db: {db_path} cannot be opened: {exc}") from None
    try:
        conn.execute("BEGIN IMMEDIATE")
        # executescript() would commit; run the DDL statement by statement inside our transaction
        for statement in SCHEMA_SQL.split(";"):
            if statement.strip():
                conn.execute(statement)
        existing = {r[1] for r in conn.execute("PRAGMA table_info(mutations)").fetchall()}
        for column in extra_columns:
            if column not in existing:
                conn.execute(f'ALTER TABLE mutations ADD COLUMN "{column}" NUMERIC')  # validated identifier
        row = conn.execute("SELECT id FROM sources WHERE source_text = ?", (source,)).fetchone()
        replaced = 0
        if row is not None:
            if not replace:
                raise DataError(
                    f"--source: {source!r} is already in {db_path}; pass --replace to overwrite it or choose another name"
                )
            source_id = row[0]
            replaced = conn.execute("DELETE FROM mutations WHERE source_id = ?", (source_id,)).rowcount
            conn.execute(
                "UPDATE sources SET template = ?, description = ? WHERE id = ?", (template, description, source_id)
            )
        else:
            source_id = conn.execute(
                "INSERT INTO sources (source_text, template, description) VALUES (?, ?, ?)",
                (source, template, description),
            ).lastrowid
        names = ["source_id", "mutant", "mut_num", "DMS_score", "DMS_score_bin", *extra_columns]
        sql = (
            f"INSERT INTO mutations ({', '.join(f'{chr(34)}{n}{chr(34)}' for n in names)}) "
            f"VALUES ({', '.join('?' * len(names))})"
        )
        conn.executemany(sql, ((source_id, *r) for r in rows))
        conn.execute("COMMIT")
        return replaced
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()


def build_demo_db(path: str | Path, *, replace: bool = False) -> ImportResult:
    """Write the demo database (BLAT_ECOLX, Stiffler 2015, 4,997 single mutants) to `path`.

    Built from the bundled runner/data/blat_ecolx.csv; an existing file at `path` gets the demo
    source added (or replaced with `replace`).
    """
    if not DEMO_CSV.is_file():
        raise DataError(f"the bundled demo data {DEMO_CSV} is missing; reinstall infra from a source checkout")
    path = Path(path)
    if not replace and path.is_file():
        try:
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            try:
                present = conn.execute("SELECT 1 FROM sources WHERE source_text = ?", (DEMO_SOURCE,)).fetchone()
            finally:
                conn.close()
        except sqlite3.Error:
            present = None  # not a mutation database (yet): import_csv reports what is wrong
        if present:
            raise DataError(f"{path} already has the demo data ({DEMO_SOURCE}); pass --replace to rebuild it")
    return import_csv(DEMO_CSV, path, DEMO_SOURCE, DEMO_TEMPLATE, description=DEMO_DESCRIPTION, replace=replace)
