"""Reading DMS tables as streams of rows: CSV/TSV (also gzipped or in a zip) with the standard
library, Parquet with pyarrow; headers checked (a duplicated column is an error naming it)."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import DataError, UsageError, shorten

# --- reading tables ---------------------------------------------------------------------------------


TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".txt", ".csv.gz", ".tsv.gz", ".tab.gz", ".txt.gz", ".parquet", ".pq")
BATCH_ROWS = 20_000  # rows per executemany: large enough to amortise the call, small enough to stay bounded
MAX_FIELD = 1 << 24  # a 16 MB field (csv's default 128 KB would refuse a 10,000-substitution mutant's sequence)


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
