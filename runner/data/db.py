"""The SQLite layout of a mutation database (docs/data.md), read from the file's own catalogue.

Standard library only: the host uses it to validate plans without importing pandas or torch, the
training core and the importer use the same DDL.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from runner.errors import DataError

log = logging.getLogger(__name__)

SQLITE_MAGIC = b"SQLite format 3\x00"
REQUIRED_TABLES = ("sources", "mutations")

# The lab's layout (the original design note), typed. `infra data import` writes exactly these names
# in this order; databases made by the lab's own script (the same DDL without types) and by infra
# 0.1 (`source_id` for `source`, a `sources.description` column) are read as they are.
SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS sources (
    id          INTEGER PRIMARY KEY,
    source_text TEXT NOT NULL UNIQUE,
    template    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS mutations (
    id            INTEGER PRIMARY KEY,
    mutant        TEXT NOT NULL DEFAULT '',
    DMS_score     REAL,
    DMS_score_bin INTEGER,
    mut_num       INTEGER,
    source        INTEGER NOT NULL REFERENCES sources(id)
);
CREATE INDEX IF NOT EXISTS mutations_source ON mutations(source);
"""
LAYOUT_TEXT = (
    "sources(id, source_text, template), "
    "mutations(id, mutant, DMS_score, DMS_score_bin, mut_num, source REFERENCES sources(id))"
)
SOURCE_COLUMNS = ("id", "source_text", "template")
MUTATION_COLUMNS = ("id", "mutant", "DMS_score")  # besides the foreign key; mut_num and DMS_score_bin are optional
SOURCE_KEYS = ("source", "source_id")  # the lab's name first; source_id is what infra 0.1 wrote


@dataclass(frozen=True)
class DbLayout:
    """What the core needs to know about a database's tables, read from its own catalogue.

    `source_key` is the `mutations` column that refers to `sources.id`; `mut_num` and
    `DMS_score_bin` may be missing columns (then derived / unknown); `id_is_rowid` says whether
    `mutations.id` is SQLite's row id (ordered, unique, range reads are B-tree searches).
    """

    mutation_columns: tuple[str, ...]
    source_columns: tuple[str, ...]
    source_key: str
    id_is_rowid: bool

    @property
    def has_mut_num(self) -> bool:
        return "mut_num" in self.mutation_columns

    @property
    def has_bin(self) -> bool:
        return "DMS_score_bin" in self.mutation_columns

    @property
    def extras(self) -> list[str]:
        """`mutations` columns beyond the standard ones (split columns, conditions), in table order."""
        standard = {"id", "mutant", "DMS_score", "DMS_score_bin", "mut_num", self.source_key}
        return [c for c in self.mutation_columns if c not in standard]

    @property
    def filter_columns(self) -> list[str]:
        """Columns `data.where` and `split.column` may name: mutations' (mut_num always), then sources'."""
        names = list(self.mutation_columns) + ([] if self.has_mut_num else ["mut_num"])
        return names + [c for c in self.source_columns if c not in names]


def read_layout(conn: sqlite3.Connection, name: str = "the database") -> DbLayout:
    """The layout of an open mutation database, or a DataError naming the missing table or column."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
    missing = [t for t in REQUIRED_TABLES if t not in tables]
    if missing:
        raise DataError(
            f"{name} has no {' and no '.join(repr(t) for t in missing)} table; import data with 'infra data import'"
        )
    info = conn.execute("PRAGMA table_info(mutations)").fetchall()
    mutation_columns = tuple(r[1] for r in info)
    source_columns = tuple(r[1] for r in conn.execute("PRAGMA table_info(sources)"))
    lacking = [f"sources.{c}" for c in SOURCE_COLUMNS if c not in source_columns]
    lacking += [f"mutations.{c}" for c in MUTATION_COLUMNS if c not in mutation_columns]
    declared = [r[3] for r in conn.execute("PRAGMA foreign_key_list(mutations)") if r[2].lower() == "sources"]
    declared = [c for c in declared if c in mutation_columns]
    if len(declared) == 1:
        source_key = declared[0]
    else:
        source_key = next((c for c in SOURCE_KEYS if c in mutation_columns), "")
        if not source_key:
            lacking.append("mutations.source (the reference to sources.id)")
    if lacking:
        raise DataError(f"{name} lacks column(s) {', '.join(lacking)}; expected the layout {LAYOUT_TEXT}")
    pk = [r for r in info if r[5]]
    id_is_rowid = len(pk) == 1 and pk[0][1] == "id" and pk[0][2].upper() == "INTEGER"
    return DbLayout(mutation_columns, source_columns, source_key, id_is_rowid)


def readonly_uri(path: Path) -> str:
    """The SQLite URI that opens `path` read-only without ever writing to it.

    `mode=ro` needs the `-shm`/`-wal` files of a WAL database to exist or be creatable; in a
    read-only folder (the container's read-only mount) they are neither and SQLite says "unable to
    open database file". Nobody can be writing through such a folder, so the file is then opened
    `immutable=1` (no locking, no side files). The main file's bytes are never written either way.
    """
    path = Path(path).resolve()
    uri = f"{path.as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return uri
    except sqlite3.OperationalError:
        if os.access(path.parent, os.W_OK):
            raise
    finally:
        conn.close()
    log.info("%s: opened immutable (WAL database in a read-only folder)", path)
    return f"{uri}&immutable=1"


def connect_readonly(path: Path) -> sqlite3.Connection:
    """A read-only sqlite3 connection to `path` (see `readonly_uri`)."""
    return sqlite3.connect(readonly_uri(path), uri=True)


def check_database(path: Path) -> str | None:
    """Return None when `path` is a readable mutation database, else what is wrong with it (one line)."""
    path = Path(path)
    if not path.exists():
        return f"{path} does not exist; create it with 'infra data import' or fix the path"
    if not path.is_file():
        return f"{path} is not a file"
    try:
        with path.open("rb") as fh:
            header = fh.read(len(SQLITE_MAGIC))
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror}"
    if header != SQLITE_MAGIC:
        return f"{path} is not a SQLite database"
    try:
        conn = connect_readonly(path)
        try:
            read_layout(conn, str(path))
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"{path} cannot be opened as SQLite: {exc}"
    except DataError as exc:
        return exc.message
    return None


def require_database(path: Path) -> None:
    """Raise DataError when `path` is not a usable mutation database."""
    problem = check_database(path)
    if problem:
        raise DataError(problem)
