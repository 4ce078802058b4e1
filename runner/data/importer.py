"""Import deep-mutational-scanning tables into the mutation database (docs/data.md).

A table has a `mutant` column (`A23G:L45P`, 1-based, `*` = stop, empty = wild type), a score column
(`DMS_score` by default), optionally `DMS_score_bin` (or a cutoff computes it) and, as in
ProteinGym, `mutated_sequence` (checked against the template, or the template's source when none is
given). CSV and TSV, also gzipped or inside a zip, are read with the standard library; Parquet needs
pyarrow.

Imports stream: rows are checked and written in batches inside one transaction, so memory does not
grow with the file, and an import is still all or nothing — a new database is built in a temporary
file and renamed into place, an existing one is changed inside one transaction that a bad row rolls
back. `import_proteingym` imports a folder or zip of ProteinGym assays, one transaction per assay.

Example::

    import_csv("BLAT.csv", "dms.sqlite", source="BLAT_ECOLX", template="MSIQHF...", score_column="2500",
               binarize_cutoff=-1.1595)
    import_proteingym("DMS_ProteinGym_substitutions.zip", "pg.sqlite", assays=["BLAT_ECOLX_Stiffler_2015"])
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import gzip
import io
import logging
import math
import os
import re
import sqlite3
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.data.db import SCHEMA_SQL, SQLITE_MAGIC, read_layout
from runner.errors import DataError, InfraError, UsageError, shorten

log = logging.getLogger(__name__)

SUBSTITUTION = re.compile(r"([A-Za-z])([0-9]{1,9})([A-Za-z*])")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
TEMPLATE = re.compile(r"[A-Za-z*]+")
WILD_TYPE_SPELLINGS = {"", "_wt", "wt", "WT", "wildtype", "wild_type"}
MISSING_VALUES = {"", "nan", "NaN", "NAN", "NA", "N/A", "na", "null", "NULL", "None"}
RESERVED_COLUMNS = {"id", "source", "source_id", "mutant", "mut_num", "DMS_score", "DMS_score_bin"}
SEQUENCE_COLUMN = "mutated_sequence"
FOLD_PREFIX = "fold_"  # ProteinGym's supervised split columns: fold_random_5, fold_modulo_5, fold_contiguous_5
TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".txt", ".csv.gz", ".tsv.gz", ".tab.gz", ".txt.gz", ".parquet", ".pq")
BATCH_ROWS = 20_000  # rows per executemany: large enough to amortise the call, small enough to stay bounded
MAX_FIELD = 1 << 24  # a 16 MB field (csv's default 128 KB would refuse a 10,000-substitution mutant's sequence)
DUPLICATE_EXAMPLES = 3

DEMO_CSV = Path(__file__).resolve().parent / "blat_ecolx.csv"
DEMO_SOURCE = "BLAT_ECOLX_Stiffler_2015"
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
    non_finite_scores: int = 0  # ±inf scores, stored as NULL like a missing score
    duplicate_mutants: int = 0  # distinct mutant strings that occur more than once in this source
    duplicate_examples: tuple[str, ...] = ()
    template_from: str = "--template"  # or "mutated_sequence", "reference"
    extra_columns: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        doc = dict(self.__dict__)
        doc["duplicate_examples"] = list(self.duplicate_examples)
        doc["extra_columns"] = list(self.extra_columns)
        return doc


# --- reading tables ---------------------------------------------------------------------------------


@dataclass
class Table:
    """An open table: its header and an iterator of (location, values) rows; `where(loc)` names a row."""

    name: str
    header: list[str]
    rows: Iterator[tuple[int, Sequence[Any]]]
    line_numbers: bool = True  # CSV: loc is the line; Parquet: loc is the 1-based data row

    def where(self, loc: int) -> str:
        return f"{self.name}:{loc}" if self.line_numbers else f"{self.name}: row {loc}"


def _base_name(name: str) -> str:
    lower = name.lower()
    return lower[:-3] if lower.endswith(".gz") else lower


def _check_header(name: str, header: list[str]) -> list[str]:
    header = [h.strip() for h in header]
    if not header or header == [""]:
        raise DataError(f"{name}: the file is empty; expected a header with 'mutant' and a score column")
    seen: dict[str, int] = {}
    for h in header:
        seen[h] = seen.get(h, 0) + 1
    twice = [h for h, k in seen.items() if k > 1]
    if twice:
        raise DataError(
            f"{name}: column {twice[0]!r} appears {seen[twice[0]]} times in the header; "
            "rename or remove the copies so it is clear which one to use"
        )
    return header


def _text_rows(name: str, handle: io.TextIOBase, delimiter: str | None) -> Table:
    csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD))
    try:
        first = handle.readline()
    except UnicodeDecodeError:
        raise DataError(f"{name}: not UTF-8 text; save the file as UTF-8") from None
    if delimiter is None:  # sniff only what matters: a tab-separated header has tabs and no commas
        delimiter = "\t" if "\t" in first and "," not in first else ","
    try:
        header = next(csv.reader([first], delimiter=delimiter), [])
    except csv.Error as exc:
        raise DataError(f"{name}:1: the header is not valid CSV: {exc}") from None
    header = _check_header(name, header)
    reader = csv.reader(handle, delimiter=delimiter)

    def rows() -> Iterator[tuple[int, list[str]]]:
        try:
            for values in reader:
                if values:  # csv gives [] for a blank line
                    yield reader.line_num + 1, values
        except csv.Error as exc:
            raise DataError(f"{name}:{reader.line_num + 1}: not valid CSV: {exc}") from None
        except UnicodeDecodeError:
            raise DataError(f"{name}: not UTF-8 text (near line {reader.line_num + 1}); save it as UTF-8") from None
        except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
            raise DataError(f"{name}: the file is damaged or truncated ({exc}); download it again") from None

    return Table(name, header, rows())


def _parquet_table(name: str, path: Path, stack: contextlib.ExitStack) -> Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(
            f"{name}: reading Parquet needs pyarrow: pip install pyarrow (or install infra with the 'core' extra), "
            "or convert the file to CSV"
        ) from None
    try:
        handle = stack.enter_context(pq.ParquetFile(path))
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{name}: not a readable Parquet file ({shorten(str(exc), 200)})") from None
    header = _check_header(name, [str(n) for n in handle.schema_arrow.names])

    def rows() -> Iterator[tuple[int, tuple]]:
        n = 0
        for batch in handle.iter_batches(batch_size=BATCH_ROWS):
            columns = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
            for values in zip(*columns, strict=True):
                n += 1
                yield n, values

    return Table(name, header, rows(), line_numbers=False)


@contextlib.contextmanager
def open_table(path: str | Path, member: str | None = None) -> Iterator[Table]:
    """Open a CSV/TSV (optionally .gz), a Parquet file, or one table inside a zip, for streaming.

    A zip without `member` must hold exactly one table. Every problem is a one-line DataError
    naming the file; nothing is read into memory beyond one batch.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(
            f"{path} is a folder; pass one data file (for ProteinGym folders use 'infra data import-proteingym')"
        )
    if not path.is_file():
        raise DataError(f"{path} does not exist; check the path")
    with contextlib.ExitStack() as stack:
        try:
            with path.open("rb") as fh:
                magic = fh.read(4)
        except OSError as exc:
            raise DataError(f"{path}: cannot be read: {exc.strerror}") from None
        if magic.startswith(b"PK") or member is not None:
            try:
                archive = stack.enter_context(zipfile.ZipFile(path))
            except (zipfile.BadZipFile, OSError) as exc:
                raise DataError(f"{path}: not a readable zip archive ({exc})") from None
            if member is None:
                members = zip_tables(archive)
                if len(members) != 1:
                    listed = ", ".join(members[:5]) + (" …" if len(members) > 5 else "")
                    raise DataError(
                        f"{path}: the zip holds {len(members)} tables ({listed or 'none'}); it must hold exactly one "
                        "(for ProteinGym archives use 'infra data import-proteingym')"
                    )
                member = members[0]
            name = f"{path}:{member}"
            raw = stack.enter_context(archive.open(member))
            if member.lower().endswith(".gz"):
                raw = stack.enter_context(gzip.GzipFile(fileobj=raw))
            base = _base_name(member)
        else:
            name = str(path)
            base = _base_name(path.name)
            if base.endswith((".parquet", ".pq")) or magic == b"PAR1":
                yield _parquet_table(name, path, stack)
                return
            raw = stack.enter_context(path.open("rb"))
            if magic[:2] == b"\x1f\x8b":
                raw = stack.enter_context(gzip.GzipFile(fileobj=raw))
        if base.endswith((".parquet", ".pq")):
            raise DataError(f"{name}: Parquet inside a zip is not supported; extract it first")
        text = stack.enter_context(io.TextIOWrapper(raw, encoding="utf-8-sig", newline=""))
        delimiter = "\t" if base.endswith((".tsv", ".tab")) else ("," if base.endswith(".csv") else None)
        try:
            table = _text_rows(name, text, delimiter)
        except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
            raise DataError(f"{name}: the file is damaged or truncated ({exc}); download it again") from None
        yield table


def zip_tables(archive: zipfile.ZipFile) -> list[str]:
    """The table members of a zip (CSV/TSV/Parquet, optionally gzipped), without macOS resource forks."""
    return [
        n
        for n in archive.namelist()
        if not n.endswith("/")
        and "__MACOSX" not in n
        and not Path(n).name.startswith("._")
        and n.lower().endswith(TABLE_SUFFIXES)
    ]


# --- checking rows ----------------------------------------------------------------------------------


def parse_substitutions(mutant: str, where: str) -> list[tuple[str, int, str]]:
    """`A23G:L45P` -> [('A', 23, 'G'), ('L', 45, 'P')]; [] for the wild type. DataError when malformed."""
    if mutant in WILD_TYPE_SPELLINGS:
        return []
    out = []
    seen: set[int] = set()
    for part in mutant.split(":"):
        match = SUBSTITUTION.fullmatch(part)
        if match is None:
            raise DataError(
                f"{where}: mutant {shorten(mutant)} is malformed at {shorten(part, 30)}; "
                "expected e.g. 'A23G' or 'A23G:L45P' (1-based)"
            )
        wt, pos_text, new = match.groups()
        pos = int(pos_text)
        if pos in seen:
            raise DataError(f"{where}: mutant {shorten(mutant)} mutates position {pos} twice")
        seen.add(pos)
        out.append((wt.upper(), pos, new.upper()))
    return out


def check_substitutions(subs: list[tuple[str, int, str]], mutant: str, template: str, where: str, hint: str) -> None:
    """DataError unless every substitution lies in `template` and names its wild-type letter."""
    for wt, pos, _ in subs:
        if not 1 <= pos <= len(template):
            raise DataError(
                f"{where}: mutant {shorten(mutant)}: position {pos} is outside the template (length {len(template)})"
            )
        if template[pos - 1] != wt:
            raise DataError(
                f"{where}: mutant {shorten(mutant)}: wild type {wt!r} at position {pos} does not match the template's "
                f"{template[pos - 1]!r}; {hint}"
            )


def parse_mutant(mutant: str, template: str, where: str) -> int:
    """Check one mutant string against the template and return its number of substitutions."""
    subs = parse_substitutions(mutant, where)
    check_substitutions(subs, mutant, template, where, "check --template and that positions are 1-based")
    return len(subs)


def _apply(template: str, subs: list[tuple[str, int, str]]) -> str:
    pieces, last = [], 0
    for _, pos, new in sorted(subs, key=lambda s: s[1]):
        pieces += [template[last : pos - 1], new]
        last = pos
    pieces.append(template[last:])
    return "".join(pieces)


def _template_from_sequence(sequence: str, subs: list[tuple[str, int, str]], mutant: str, where: str) -> str:
    """The wild type of a ProteinGym row: its mutated_sequence with the substitutions reverted."""
    seq = sequence.strip().upper()
    if not TEMPLATE.fullmatch(seq):
        raise DataError(f"{where}: {SEQUENCE_COLUMN} {shorten(sequence)} is not a protein sequence (letters, '*')")
    letters = list(seq)
    for wt, pos, new in subs:
        if not 1 <= pos <= len(letters) or letters[pos - 1] != new:
            raise DataError(
                f"{where}: mutant {shorten(mutant)} does not fit its {SEQUENCE_COLUMN} (position {pos} should be "
                f"{new!r}); pass --template"
            )
        letters[pos - 1] = wt
    return "".join(letters)


def _parse_float(value: Any, where: str, column: str) -> float | None:
    """A score: None when missing (empty, NaN, NA…); ±inf is returned as is (the caller counts it)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return None if math.isnan(value) else float(value)
    text = str(value).strip()
    if text in MISSING_VALUES:
        return None
    try:
        number = float(text)
    except ValueError:
        raise DataError(
            f"{where}: column {column!r} value {shorten(text, 40)} is not a number (empty or NaN mean missing)"
        ) from None
    return None if math.isnan(number) else number


def _parse_bin(value: Any, where: str, column: str) -> int | None:
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    number = _parse_float(value, where, column)
    if number is None:
        return None
    if number not in (0.0, 1.0):
        raise DataError(f"{where}: column {column!r} value {shorten(value, 40)} must be 0 or 1")
    return int(number)


def _extra_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return None if value is None or value == "" else value


@dataclass
class _Counts:
    rows: int = 0
    wild_type_rows: int = 0
    nan_scores: int = 0
    non_finite_scores: int = 0
    max_mut_num: int = 0


@dataclass
class _Spec:
    """What to take from a table: columns, the template (or where it comes from) and the bins."""

    source: str
    template: str | None
    score_column: str = "DMS_score"
    bin_column: str | None = "DMS_score_bin"
    binarize_cutoff: float | None = None
    extra_columns: list[str] = field(default_factory=list)
    description: str = ""
    template_from: str = "--template"


def _row_reader(table: Table, spec: _Spec, counts: _Counts) -> Iterator[tuple]:
    """Check the header now, then lazily every row: yields (mutant, DMS_score, DMS_score_bin, mut_num, extras…).

    Sets `spec.template` from the first row's mutated_sequence when it is None.
    """
    header = table.header
    required = ["mutant", spec.score_column, *spec.extra_columns]
    if spec.bin_column and spec.binarize_cutoff is None and spec.bin_column != "DMS_score_bin":
        required.append(spec.bin_column)
    if spec.template is None:
        required.append(SEQUENCE_COLUMN)
    missing = [c for c in required if c not in header]
    if missing:
        hint = "; or pass --template" if missing == [SEQUENCE_COLUMN] else ""
        raise DataError(
            f"{table.name}: missing column(s) {', '.join(map(repr, missing))}; the header has: "
            f"{shorten(', '.join(header), 300, quote=False)}{hint}"
        )
    index = {h: i for i, h in enumerate(header)}
    i_mutant, i_score = index["mutant"], index[spec.score_column]
    use_bin = spec.binarize_cutoff is None and bool(spec.bin_column) and spec.bin_column in index
    i_bin = index[spec.bin_column] if use_bin else None
    i_seq = index.get(SEQUENCE_COLUMN)
    i_extras = [index[c] for c in spec.extra_columns]
    hint = (
        "check --template and that positions are 1-based"
        if spec.template_from == "--template"
        else f"the template comes from {spec.template_from}"
    )
    return _rows(table, spec, counts, hint, i_mutant, i_score, i_bin, i_seq, i_extras)


KNOWN_MAX = 1 << 18  # cache of checked substitutions (a template has at most ~21 per position)


def _fast_substitutions(mutant: Any, template: str, known: dict[str, tuple[str, int, str]]) -> list | None:
    """The substitutions of an ordinary mutant, each checked against the template, or None when the
    row needs the careful path (wild type, anything malformed or mismatched: it names the problem).

    Checked substitutions are cached by their text, so a row costs a few dict lookups; the cache is
    bounded by the template's possible substitutions, not by the file.
    """
    if not isinstance(mutant, str) or not mutant or mutant in WILD_TYPE_SPELLINGS:
        return None
    subs = []
    for part in mutant.split(":"):
        hit = known.get(part)
        if hit is None:
            match = SUBSTITUTION.fullmatch(part)
            if match is None:
                return None
            wt, pos_text, new = match.groups()
            pos = int(pos_text)
            if not 1 <= pos <= len(template) or template[pos - 1] != wt.upper():
                return None
            hit = (wt.upper(), pos, new.upper())
            if len(known) < KNOWN_MAX:
                known[part] = hit
        subs.append(hit)
    if len(subs) > 1 and len({pos for _, pos, _ in subs}) != len(subs):
        return None
    return subs


def _rows(table, spec, counts, hint, i_mutant, i_score, i_bin, i_seq, i_extras) -> Iterator[tuple]:
    """The row loop: a fast path for ordinary rows; anything else goes through the checks that name
    the file, line and problem (the messages are only built when a row needs them)."""
    width = len(table.header)
    template = spec.template
    known: dict[str, tuple[str, int, str]] = {}
    for loc, values in table.rows:
        if len(values) != width:
            more = "more" if len(values) > width else "fewer"
            raise DataError(f"{table.where(loc)}: the row has {more} fields ({len(values)}) than the header ({width})")
        mutant = values[i_mutant]
        if isinstance(mutant, str):
            mutant = mutant.strip()
        subs = _fast_substitutions(mutant, template, known) if template is not None else None
        if subs is None:
            where = table.where(loc)
            mutant = "" if mutant is None else str(mutant).strip()
            subs = parse_substitutions(mutant, where)
            if template is None:
                template = _template_from_sequence(str(values[i_seq] or ""), subs, mutant, where)
                spec.template, hint = template, f"the template was taken from the {SEQUENCE_COLUMN} of {where}"
            check_substitutions(subs, mutant, template, where, hint)
        if i_seq is not None:
            sequence, expected = values[i_seq], _apply(template, subs)
            if sequence is not None and sequence != expected and str(sequence).strip().upper() != expected:
                raise DataError(
                    f"{table.where(loc)}: {SEQUENCE_COLUMN} is not the template with mutant {shorten(mutant)} "
                    f"applied; {hint}"
                )
        mut_num = len(subs)
        if mut_num == 0:
            mutant = ""
            counts.wild_type_rows += 1
        elif mut_num > counts.max_mut_num:
            counts.max_mut_num = mut_num
        raw = values[i_score]
        try:
            score = float(raw)
        except (TypeError, ValueError):
            score = _parse_float(raw, table.where(loc), spec.score_column)
        if score is None or score != score:  # missing, or NaN
            score = None
            counts.nan_scores += 1
        elif score in (math.inf, -math.inf):
            counts.non_finite_scores += 1
            score = None
        if spec.binarize_cutoff is not None:
            score_bin = None if score is None else int(score >= spec.binarize_cutoff)
        elif i_bin is not None:
            raw = values[i_bin]
            score_bin = 1 if raw == "1" else 0 if raw == "0" else _parse_bin(raw, table.where(loc), spec.bin_column)
        else:
            score_bin = None
        counts.rows += 1
        if i_extras:
            yield (mutant, score, score_bin, mut_num, *[_extra_value(values[i]) for i in i_extras])
        else:
            yield (mutant, score, score_bin, mut_num)


# --- writing ---------------------------------------------------------------------------------------


def _check_arguments(source: str, template: str | None, extra_columns: Sequence[str], score_column: str) -> str | None:
    if not source or source != source.strip():
        raise UsageError(f"--source: {source!r} must be a non-empty name without surrounding spaces")
    if template is not None:
        template = template.strip()
        if not TEMPLATE.fullmatch(template):
            raise UsageError("--template: must be a protein sequence of one-letter codes (A-Z, '*'), e.g. 'MSIQHF...'")
        template = template.upper()
    for column in extra_columns:
        if not IDENTIFIER.fullmatch(column):
            raise UsageError(f"--extra-columns: {column!r} is not a valid column name (letters, digits, '_')")
        if column in RESERVED_COLUMNS:
            raise UsageError(f"--extra-columns: {column!r} is a standard column of the mutations table; leave it out")
        if column == score_column:
            raise UsageError(f"--extra-columns: {column!r} is already the score column")
    if len(set(extra_columns)) != len(extra_columns):
        raise UsageError("--extra-columns: a column is listed twice")
    return template


def check_db_file(db_path: Path) -> bool:
    """True when `db_path` exists (and is SQLite); False when it is to be created. DataError otherwise."""
    if not db_path.exists():
        if not db_path.parent.is_dir():
            raise DataError(f"--db: folder {db_path.parent} does not exist; create it first")
        return False
    if not db_path.is_file():
        raise DataError(f"--db: {db_path} is not a file")
    try:
        with db_path.open("rb") as fh:
            header = fh.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise DataError(f"--db: {db_path} cannot be read: {exc.strerror}") from None
    if header and header != SQLITE_MAGIC:
        raise DataError(f"--db: {db_path} is not a SQLite database; pass a new file name or a mutation database")
    return True


def _connect(db_path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(db_path, isolation_level=None, timeout=30)
    except sqlite3.Error as exc:
        raise DataError(f"--db: {db_path} cannot be opened: {exc}") from None
    conn.execute("PRAGMA cache_size = -32000")  # 32 MB: a bound, and enough to keep the index pages hot
    return conn


def _prepare(conn: sqlite3.Connection, db_path: Path, spec: _Spec):
    """Create or adapt the tables inside the open transaction; return the layout to write into."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not {"sources", "mutations"} & tables:
        # executescript() would commit; run the DDL statement by statement inside our transaction
        for statement in SCHEMA_SQL.split(";"):
            if statement.strip():
                conn.execute(statement)
    try:
        layout = read_layout(conn, f"--db: {db_path}")
    except DataError as exc:
        raise DataError(f"{exc.message}; import into a new file instead") from None
    wanted = [("mut_num", "INTEGER"), ("DMS_score_bin", "INTEGER")]
    wanted += [(c, "NUMERIC") for c in spec.extra_columns]
    for column, kind in wanted:
        if column not in layout.mutation_columns:
            conn.execute(f'ALTER TABLE mutations ADD COLUMN "{column}" {kind}')  # validated identifier
    if spec.description and "description" not in layout.source_columns:
        conn.execute("ALTER TABLE sources ADD COLUMN description TEXT")
    return read_layout(conn, f"--db: {db_path}")


def _next_id(conn: sqlite3.Connection, table: str, rowid: bool) -> int:
    # Explicit ids: the lab's DDL leaves `id` untyped, so SQLite would not number rows by itself.
    # max() of a row id reads one end of the B-tree; of an untyped column it scans the table.
    only_integers = "" if rowid else " WHERE typeof(id) = 'integer'"
    return conn.execute(f"SELECT coalesce(max(id), 0) + 1 FROM {table}{only_integers}").fetchone()[0]


def _write(db_path: Path, spec: _Spec, rows: Iterable[tuple], replace: bool, fresh: bool) -> tuple[int, int, list[str]]:
    """Write one source inside one transaction; returns (rows replaced, duplicate count, examples)."""
    conn = _connect(db_path)
    try:
        if fresh:  # a temporary file that is deleted on any error: no journal needed
            conn.execute("PRAGMA journal_mode = OFF")
            conn.execute("PRAGMA synchronous = OFF")
        conn.execute("BEGIN IMMEDIATE")
        layout = _prepare(conn, db_path, spec)
        key = layout.source_key
        found = conn.execute("SELECT id FROM sources WHERE source_text = ?", (spec.source,)).fetchall()
        replaced = 0
        if found:
            if not replace:
                raise DataError(
                    f"--source: {spec.source!r} is already in {db_path}; pass --replace to overwrite it or choose "
                    "another name"
                )
            source_id = found[0][0]
            replaced = conn.execute(f'DELETE FROM mutations WHERE "{key}" = ?', (source_id,)).rowcount
        else:
            source_id = _next_id(conn, "sources", rowid=False)
            conn.execute(
                "INSERT INTO sources (id, source_text, template) VALUES (?, ?, ?)", (source_id, spec.source, "")
            )
        names = ["id", key, "mutant", "DMS_score", "DMS_score_bin", "mut_num", *spec.extra_columns]
        quoted = ", ".join(f'"{n}"' for n in names)  # names: the layout's and validated identifiers
        sql = f"INSERT INTO mutations ({quoted}) VALUES ({', '.join('?' * len(names))})"
        next_id = _next_id(conn, "mutations", rowid=layout.id_is_rowid)
        batch: list[tuple] = []
        for row in rows:
            batch.append((next_id, source_id, *row))
            next_id += 1
            if len(batch) >= BATCH_ROWS:
                conn.executemany(sql, batch)
                batch.clear()
        if batch:
            conn.executemany(sql, batch)
        # the template is known once the rows are (it may come from the first row's mutated_sequence)
        conn.execute("UPDATE sources SET template = ? WHERE id = ?", (spec.template, source_id))
        if spec.description:
            conn.execute("UPDATE sources SET description = ? WHERE id = ?", (spec.description, source_id))
        duplicates, examples = 0, []
        for mutant, _ in conn.execute(
            f'SELECT mutant, count(*) FROM mutations WHERE "{key}" = ? GROUP BY mutant HAVING count(*) > 1',
            (source_id,),
        ):
            duplicates += 1
            if len(examples) < DUPLICATE_EXAMPLES:
                examples.append(mutant)
        conn.execute("COMMIT")
        return replaced, duplicates, examples
    except sqlite3.DatabaseError as exc:
        raise DataError(f"--db: {db_path}: {exc}; nothing was imported") from None
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


def _import_table(
    open_: Callable[[], contextlib.AbstractContextManager[Table]], db_path: Path, spec: _Spec, replace: bool
) -> ImportResult:
    """Stream one table into `db_path` as one source, all or nothing (see module docstring)."""
    exists = check_db_file(db_path)
    counts = _Counts()
    with open_() as table:
        rows = _row_reader(table, spec, counts)
        if exists:
            replaced, dups, examples = _write(db_path, spec, _nonempty(rows, table), replace, fresh=False)
        else:
            try:
                fd, tmp_name = tempfile.mkstemp(prefix=f".{db_path.name}.", suffix=".tmp", dir=db_path.parent)
            except OSError as exc:
                raise DataError(f"--db: cannot create a file in {db_path.parent}: {exc.strerror}") from None
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the database should get normal permissions
                replaced, dups, examples = _write(tmp, spec, _nonempty(rows, table), replace, fresh=True)
                with tmp.open("rb+") as fh:
                    os.fsync(fh.fileno())
                if db_path.exists():
                    raise DataError(f"--db: {db_path} appeared during the import; run it again")
                os.replace(tmp, db_path)
            finally:
                tmp.unlink(missing_ok=True)
    result = ImportResult(
        db=str(db_path),
        source=spec.source,
        rows=counts.rows,
        wild_type_rows=counts.wild_type_rows,
        nan_scores=counts.nan_scores,
        max_mut_num=counts.max_mut_num,
        replaced=replaced,
        created_db=not exists,
        non_finite_scores=counts.non_finite_scores,
        duplicate_mutants=dups,
        duplicate_examples=tuple(examples),
        template_from=spec.template_from,
        extra_columns=tuple(spec.extra_columns),
    )
    if dups:
        log.info(  # the CLI warns; library callers get the counts in the result
            "%s: %d mutant(s) occur more than once (e.g. %s); they are kept as separate rows",
            spec.source,
            dups,
            ", ".join(shorten(m, 40) for m in examples),
        )
    log.info("imported %d rows of %s into %s", counts.rows, spec.source, db_path)
    return result


def _nonempty(rows: Iterator[tuple], table: Table) -> Iterator[tuple]:
    empty = True
    for row in rows:
        empty = False
        yield row
    if empty:
        raise DataError(f"{table.name}: no data rows after the header")


def import_csv(
    csv_path: str | Path,
    db_path: str | Path,
    source: str,
    template: str | None = None,
    *,
    description: str = "",
    score_column: str = "DMS_score",
    bin_column: str | None = "DMS_score_bin",
    binarize_cutoff: float | None = None,
    extra_columns: Iterable[str] = (),
    replace: bool = False,
) -> ImportResult:
    """Import one table (CSV, TSV, .gz, a one-table .zip, Parquet) as source `source` into `db_path`.

    DMS_score comes from `score_column`; DMS_score_bin from `bin_column` when the table has it, or is
    `score >= binarize_cutoff` when a cutoff is given, else NULL. Without `template` the table must
    have `mutated_sequence`: the first row's, with its substitutions reverted, is the template, and
    every row's is checked against it (also when a template is given). `extra_columns` are copied
    into same-named `mutations` columns (added when missing; NULL for other sources). Importing a
    source that already exists is a DataError unless `replace`, which swaps its rows and template.
    """
    csv_path, db_path = Path(csv_path), Path(db_path)
    extra_columns = list(extra_columns)
    template = _check_arguments(source, template, extra_columns, score_column)
    spec = _Spec(
        source=source,
        template=template,
        score_column=score_column,
        bin_column=bin_column,
        binarize_cutoff=binarize_cutoff,
        extra_columns=extra_columns,
        description=description,
        template_from="--template" if template is not None else SEQUENCE_COLUMN,
    )
    return _import_table(lambda: open_table(csv_path), db_path, spec, replace)


# --- ProteinGym ------------------------------------------------------------------------------------

REFERENCE_NAME = "DMS_substitutions.csv"


@dataclass(frozen=True)
class Assay:
    """One row of ProteinGym's reference file that matters for an import."""

    dms_id: str
    filename: str
    target_seq: str
    cutoff: float | None


@dataclass
class ProteinGymResult:
    """Per assay: imported (with its ImportResult), skipped (already there) or failed (with the error)."""

    db: str
    reference: str
    assays: list[dict] = field(default_factory=list)
    ignored_files: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for a in self.assays if a["status"] == status)

    def to_dict(self) -> dict:
        return {
            "db": self.db,
            "reference": self.reference,
            "imported": self.count("imported"),
            "skipped": self.count("skipped"),
            "failed": self.count("failed"),
            "assays": self.assays,
            "ignored_files": self.ignored_files,
        }


def read_reference(open_: Callable[[], contextlib.AbstractContextManager[Table]]) -> dict[str, Assay]:
    """DMS_id -> Assay from ProteinGym's DMS_substitutions.csv (DMS_id, DMS_filename, target_seq, cutoff)."""
    out: dict[str, Assay] = {}
    with open_() as table:
        missing = [c for c in ("DMS_id", "target_seq") if c not in table.header]
        if missing:
            raise DataError(
                f"{table.name}: missing column(s) {', '.join(map(repr, missing))}; is this ProteinGym's "
                f"{REFERENCE_NAME}?"
            )
        index = {h: i for i, h in enumerate(table.header)}
        for loc, values in table.rows:
            if len(values) != len(table.header):
                raise DataError(f"{table.where(loc)}: the row has {len(values)} fields, the header {len(table.header)}")
            dms_id = values[index["DMS_id"]].strip()
            target = values[index["target_seq"]].strip().upper()
            if not dms_id:
                continue
            if not TEMPLATE.fullmatch(target):
                raise DataError(f"{table.where(loc)}: target_seq of {dms_id!r} is not a protein sequence")
            filename = values[index["DMS_filename"]].strip() if "DMS_filename" in index else ""
            cutoff = None
            if "DMS_binarization_cutoff" in index:
                try:
                    cutoff = float(values[index["DMS_binarization_cutoff"]])
                except ValueError:
                    cutoff = None
                if cutoff is not None and not math.isfinite(cutoff):
                    cutoff = None
            out[dms_id] = Assay(dms_id, filename or f"{dms_id}.csv", target, cutoff)
    if not out:
        raise DataError(f"{REFERENCE_NAME}: no assays listed")
    return out


class _Collection:
    """The tables of a ProteinGym folder or zip, by file name (without folders)."""

    def __init__(self, path: Path):
        self.path = path
        self.files: dict[str, Callable[[], contextlib.AbstractContextManager[Table]]] = {}
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file() and p.name.lower().endswith(TABLE_SUFFIXES) and not p.name.startswith("._"):
                    self.files.setdefault(p.name, lambda p=p: open_table(p))
        elif path.is_file():
            try:
                with zipfile.ZipFile(path) as archive:
                    members = zip_tables(archive)
            except (zipfile.BadZipFile, OSError) as exc:
                raise DataError(f"{path}: not a folder or a readable zip archive ({exc})") from None
            for m in sorted(members):
                self.files.setdefault(Path(m).name, lambda m=m: open_table(path, member=m))
        else:
            raise DataError(f"{path} does not exist; pass the folder or zip of ProteinGym assays")


def import_proteingym(
    path: str | Path,
    db_path: str | Path,
    assays: Iterable[str] = (),
    *,
    reference: str | Path | None = None,
    replace: bool = False,
    on_assay: Callable[[dict], None] | None = None,
) -> ProteinGymResult:
    """Import ProteinGym substitution assays from a folder or zip into `db_path`, one source per assay.

    Each assay (`<DMS_id>.csv`: mutant, mutated_sequence, DMS_score, DMS_score_bin, fold columns) is
    imported in its own transaction as source DMS_id with the template `target_seq` from the reference
    file (`reference`, or DMS_substitutions.csv found in `path`); its `fold_*` columns are kept for
    split.strategy "column". Assays already in the database are skipped unless `replace`, so an
    interrupted import can simply be run again. A failing assay is reported and the others go on;
    `on_assay(entry)` is called after each.
    """
    path, db_path = Path(path), Path(db_path)
    check_db_file(db_path)
    collection = _Collection(path)
    if reference is not None:
        ref_path = Path(reference)
        ref_open = lambda: open_table(ref_path)  # noqa: E731
        ref_name = str(ref_path)
    elif REFERENCE_NAME in collection.files:
        ref_open = collection.files[REFERENCE_NAME]
        ref_name = f"{path}:{REFERENCE_NAME}"
    else:
        raise UsageError(
            f"{path} has no {REFERENCE_NAME}; pass --reference with ProteinGym's reference file "
            "(reference_files/DMS_substitutions.csv of the ProteinGym release)"
        )
    known = read_reference(ref_open)
    wanted = list(dict.fromkeys(assays))
    by_file = {a.filename: a for a in known.values()}
    present = [by_file[name] for name in collection.files if name in by_file]
    ignored = sorted(n for n in collection.files if n not in by_file and n != REFERENCE_NAME)
    if wanted:
        unknown = [a for a in wanted if a not in known]
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"see the DMS_id column of {ref_name}"
            raise UsageError(f"--assay: {unknown[0]!r} is not in {ref_name}; {hint}")
        absent = [a for a in wanted if known[a].filename not in collection.files]
        if absent:
            raise DataError(f"{path}: no file {known[absent[0]].filename} for --assay {absent[0]!r}")
        chosen = [known[a] for a in wanted]
    else:
        chosen = sorted(present, key=lambda a: a.dms_id)
        if not chosen:
            raise DataError(f"{path}: none of its files is an assay listed in {ref_name} (DMS_filename)")
    result = ProteinGymResult(str(db_path), ref_name, ignored_files=ignored)
    existing = _existing_sources(db_path)
    for assay in chosen:
        entry: dict[str, Any] = {"assay": assay.dms_id, "file": assay.filename}
        if assay.dms_id in existing and not replace:
            entry.update(status="skipped", reason="already in the database; --replace re-imports it")
        else:
            try:
                imported = _import_assay(collection.files[assay.filename], db_path, assay, replace)
            except InfraError as exc:
                entry.update(status="failed", error=exc.message)
                log.info("%s: not imported: %s", assay.dms_id, exc.message)  # the caller reports it
            else:
                entry.update(status="imported", **{k: v for k, v in imported.to_dict().items() if k != "db"})
        result.assays.append(entry)
        if on_assay is not None:
            on_assay(entry)
    return result


def _import_assay(open_, db_path: Path, assay: Assay, replace: bool) -> ImportResult:
    with open_() as table:
        header = list(table.header)
    folds = [h for h in header if h.startswith(FOLD_PREFIX) and IDENTIFIER.fullmatch(h)]
    has_bin = "DMS_score_bin" in header
    spec = _Spec(
        source=assay.dms_id,
        template=assay.target_seq,
        binarize_cutoff=None if has_bin else assay.cutoff,
        extra_columns=folds,
        template_from=f"target_seq of {assay.dms_id} in {REFERENCE_NAME}",
    )
    return _import_table(open_, db_path, spec, replace)


def _existing_sources(db_path: Path) -> set[str]:
    if not db_path.is_file():
        return set()
    try:
        conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            return {r[0] for r in conn.execute("SELECT source_text FROM sources")}
        finally:
            conn.close()
    except sqlite3.Error:
        return set()  # no sources table yet (or not readable): each assay's import reports the problem


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
    return import_csv(DEMO_CSV, path, DEMO_SOURCE, DEMO_TEMPLATE, replace=replace)
