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
import fcntl
import logging
import os
import re
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from runner.data.db import SCHEMA_SQL, SQLITE_MAGIC, read_layout
from runner.data.rows import SEQUENCE_COLUMN, TEMPLATE, _Counts, _row_reader, _Spec
from runner.data.tables import BATCH_ROWS, Table, open_table
from runner.errors import DataError, UsageError, shorten

log = logging.getLogger(__name__)

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# A source name is printed, matched by plans' data.dataset and may name files one day: printable,
# path-safe characters only (every ProteinGym DMS_id fits, e.g. HSP82_YEAST_Cote-Hammarlof_2020_growth-H2O2).
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}")
SOURCE_CHARACTERS = "letters, digits, '_', '-', '.' and '+', starting with a letter or digit, no '..', at most 200"
RESERVED_COLUMNS = {"id", "source", "source_id", "mutant", "mut_num", "DMS_score", "DMS_score_bin"}
FOLD_PREFIX = "fold_"  # ProteinGym's supervised split columns: fold_random_5, fold_modulo_5, fold_contiguous_5
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


# --- writing ---------------------------------------------------------------------------------------


def source_name_problem(name: str) -> str | None:
    """What is wrong with `name` as a source name (one line, the name quoted safely), or None."""
    if SOURCE_NAME.fullmatch(name) and ".." not in name:
        return None
    return f"{shorten(name)} is not a usable source name; use {SOURCE_CHARACTERS}"


@contextlib.contextmanager
def import_lock(db_path: Path) -> Iterator[None]:
    """Hold `.<db>.import-lock` beside the database for a whole import, so that a second import into
    the same database is refused at once (instead of failing assay by assay or interleaving).

    The file is removed while still locked, so nothing is left behind; whoever opened it just before
    sees, once it holds the lock, that the name is gone or is a newer file, and starts over on that.
    """
    db_path = db_path.resolve()
    lock_path = db_path.parent / f".{db_path.name}.import-lock"
    while True:
        try:  # O_NOFOLLOW: a link planted at that name is an error, never a file elsewhere
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise DataError(f"--db: cannot create the lock file {lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataError(
                f"--db: {db_path} is being written by another import (it holds {lock_path}); run this one again "
                "when that one has finished"
            ) from None
        try:
            same = os.stat(lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us removed it: lock the current file instead
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)


def _check_arguments(source: str, template: str | None, extra_columns: Sequence[str], score_column: str) -> str | None:
    problem = source_name_problem(source)
    if problem:
        raise UsageError(f"--source: {problem}")
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
    with import_lock(db_path):
        return _import_table(lambda: open_table(csv_path), db_path, spec, replace)


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
