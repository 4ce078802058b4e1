"""The SQLite layout of a mutation database (docs/data.md), and a cheap check that a file has it.

Standard library only: the host uses it to validate plans without importing pandas or torch, the
training core and the importer use the same DDL.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

from runner.errors import DataError

log = logging.getLogger(__name__)

SQLITE_MAGIC = b"SQLite format 3\x00"
REQUIRED_TABLES = ("sources", "mutations")

SCHEMA_SQL = """
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
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table','view')").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"{path} cannot be opened as SQLite: {exc}"
    present = {name for (name,) in rows}
    missing = [t for t in REQUIRED_TABLES if t not in present]
    if missing:
        return f"{path} has no {' and no '.join(repr(t) for t in missing)} table; import data with 'infra data import'"
    return None


def require_database(path: Path) -> None:
    """Raise DataError when `path` is not a usable mutation database."""
    problem = check_database(path)
    if problem:
        raise DataError(problem)
