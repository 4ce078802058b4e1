"""Reading DMS tables as streams of rows: CSV/TSV (also gzipped or in a zip) with the standard
library, Parquet with pyarrow; headers checked (a duplicated column is an error naming it).

Input files are untrusted (a download, a colleague's zip): every read is bounded by the limits
below, each a one-line DataError (exit 2) naming the file, the line and the limit.
"""

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

# --- limits on what an import reads (docs/data.md "Limits", docs/security.md) -------------------------
# Rows stream, so memory is bounded by the longest row, not by the file; these bound that row and the
# work a small compressed file can cause. Each is far above real DMS data: ProteinGym's longest
# target_seq is 3,423 aa (its rows stay under 10 KB), its widest table has 46 columns (the reference
# file; assays have 4-7), its largest assay is about 260 MB uncompressed (SPG1_STRSG_Olson_2014,
# 536,962 rows) and the whole substitution release about 1 GB; its files deflate 5-100 times (a
# 3,423-aa mutated_sequence repeated per row reaches 100; the shared GB1 table 18).
MAX_ROW_CHARS = 1 << 20  # one row (a quoted field's lines counted together): titin's 35k aa with every
# position substituted is ~0.3 M characters; a row of this size parses to at most ~60 MB of strings
MAX_FIELDS = 10_000  # fields in the header or a row
MAX_DECOMPRESSED_BYTES = 4 << 30  # what one compressed table (.gz, zip member) may inflate to: 15 times
# ProteinGym's largest assay; a larger table can be decompressed first (plain files have no cap)
MAX_RATIO = 500  # inflated / compressed size: deflate of real tables stays under ~170 (the repeat of a
# long sequence costs a distance code per 258 bytes), a run of one byte (a bomb) reaches 1,032
RATIO_FLOOR_BYTES = 64 << 20  # the ratio is judged only past this much output: small files may be odd
MAX_BATCH_BYTES = 256 << 20  # Parquet: the values of one batch of BATCH_ROWS rows (ProteinGym's longest
# mutated_sequence, 3,423 aa, makes ~70 MB); checked on the dictionary before the values exist
MAX_FIELD = MAX_ROW_CHARS  # csv's own per-field limit (its default 128 KB is below a real long row)


def _size(n: int) -> str:
    """1 MiB, 4 GiB, 64 MiB, 1,000 bytes: a limit as the messages and docs name it."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n:,} bytes"


def _row_too_long(where: str) -> DataError:
    return DataError(
        f"{where}: the row is longer than {_size(MAX_ROW_CHARS)} ({MAX_ROW_CHARS:,} characters; a quoted field's "
        "lines count together), the importer's limit for one row; no real DMS row comes near it: check the file"
    )


def _too_many_fields(where: str, what: str, count: int) -> DataError:
    return DataError(
        f"{where}: {what} {count:,} fields, more than the importer's limit of {MAX_FIELDS:,} fields per row; "
        "no real DMS table is that wide: check the file and its delimiter"
    )


def check_declared_size(name: str, size: int, compressed: int) -> None:
    """Refuse a compressed table by the sizes its container declares (zip central directory, Parquet
    footer) before anything is decompressed; `_Capped` then counts what is really read."""
    if size > MAX_DECOMPRESSED_BYTES:
        raise DataError(
            f"{name}: declares {size:,} bytes uncompressed, more than the importer's limit of "
            f"{_size(MAX_DECOMPRESSED_BYTES)} for a compressed table; decompress it yourself to import it"
        )
    if size > RATIO_FLOOR_BYTES and size > MAX_RATIO * max(compressed, 1):
        raise DataError(
            f"{name}: declares {size:,} bytes from {compressed:,} compressed, more than {MAX_RATIO} times "
            "(the importer's limit; real DMS tables compress far less): refused as a likely zip bomb"
        )


class _Capped(io.RawIOBase):
    """A stream that counts the bytes it hands on and stops with a one-line DataError past `limit`
    or, for decompressed data, past MAX_RATIO times the compressed size (headers can lie, and a
    gzip has none): memory stays bounded whatever the file claims."""

    def __init__(self, inner: Any, name: str, limit: int, compressed: int | None, what: str):
        super().__init__()
        self._inner, self._name, self._limit, self._compressed, self._what = inner, name, limit, compressed, what
        self._count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._inner.readinto(buffer)
        self._count += n or 0
        if self._count > self._limit:
            raise DataError(
                f"{self._name}: more than {_size(self._limit)}{' after decompression' if self._compressed else ''}, "
                f"the importer's limit for {self._what}"
            )
        compressed = self._compressed
        if compressed is not None and self._count > RATIO_FLOOR_BYTES and self._count > MAX_RATIO * max(compressed, 1):
            raise DataError(
                f"{self._name}: decompresses to more than {MAX_RATIO} times its {compressed:,} compressed bytes "
                "(the importer's limit; real DMS tables compress far less): refused as a likely zip bomb"
            )
        return n


class _RowBudget:
    """Characters of the row csv is assembling: the line feeder adds, the row loop resets per row."""

    chars = 0
    start = 0  # the line the row starts on, for the message


def _bounded_lines(name: str, handle: io.TextIOBase, budget: _RowBudget) -> Iterator[str]:
    """The lines after the header, none read past MAX_ROW_CHARS (readline with a size never holds
    more); csv pulls a row's lines one by one, so `budget` also bounds a quoted field's many lines."""
    line_no = 1
    while True:
        line = handle.readline(MAX_ROW_CHARS + 1)
        if not line:
            return
        line_no += 1
        if not budget.chars:
            budget.start = line_no
        budget.chars += len(line)
        if budget.chars > MAX_ROW_CHARS:
            through = f" (through line {line_no})" if line_no != budget.start else ""
            raise _row_too_long(f"{name}:{budget.start}{through}")
        yield line


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


def _check_header(name: str, header: list[str], where: str = "") -> list[str]:
    if len(header) > MAX_FIELDS:
        raise _too_many_fields(where or name, "the header has", len(header))
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


def sniff_delimiter(header: str, name: str = "") -> str:
    """Tab for a `.tsv`/`.tab` file name (a `.gz` suffix ignored) or a header line with tabs and no
    comma, else comma: the importer and `infra predict` (the host and the core, which must read the
    same columns from one input) decide alike."""
    stem = name.lower().removesuffix(".gz")
    if stem.endswith((".tsv", ".tab")):
        return "\t"
    return "\t" if "\t" in header and "," not in header else ","


def _text_rows(name: str, handle: io.TextIOBase, delimiter: str | None) -> Table:
    csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD))
    try:
        first = handle.readline(MAX_ROW_CHARS + 1)
    except UnicodeDecodeError:
        raise DataError(f"{name}: not UTF-8 text; save the file as UTF-8") from None
    if len(first) > MAX_ROW_CHARS:
        raise _row_too_long(f"{name}:1")
    if delimiter is None:  # sniff only what matters: a tab-separated header has tabs and no commas
        delimiter = sniff_delimiter(first)
    try:
        header = next(csv.reader([first], delimiter=delimiter), [])
    except csv.Error as exc:
        raise DataError(f"{name}:1: the header is not valid CSV: {exc}") from None
    header = _check_header(name, header, f"{name}:1")
    budget = _RowBudget()
    reader = csv.reader(_bounded_lines(name, handle, budget), delimiter=delimiter)

    def rows() -> Iterator[tuple[int, list[str]]]:
        try:
            for values in reader:
                budget.chars = 0  # csv has read exactly this row's lines
                if len(values) > MAX_FIELDS:
                    raise _too_many_fields(f"{name}:{reader.line_num + 1}", "the row has", len(values))
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
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        schema = pq.read_schema(path)
        # Text columns are read as dictionaries (values once, rows as indices): what they expand to is
        # measured before it is materialised. A dictionary-encoded column declares its encoded size
        # only, so a few KB can expand to gigabytes (one long value repeated); the declared-size check
        # below cannot see that.
        text = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
                or pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]  # fmt: skip
        handle = stack.enter_context(pq.ParquetFile(path, read_dictionary=text))
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{name}: not a readable Parquet file ({shorten(str(exc), 200)})") from None
    header = _check_header(name, [str(n) for n in handle.schema_arrow.names])
    meta = handle.metadata  # declared sizes only: pyarrow decompresses one row group at a time
    check_declared_size(
        name, sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)), path.stat().st_size
    )

    def expanded_bytes(batch, first_row: int) -> int:
        """What the batch's columns take as Python values; a value over MAX_ROW_CHARS is refused."""
        total = 0
        for i in range(batch.num_columns):
            column = batch.column(i)
            if not pa.types.is_dictionary(column.type):
                total += column.nbytes
                continue
            lengths = pc.binary_length(column.dictionary)
            longest = pc.max(lengths).as_py() or 0
            if longest > MAX_ROW_CHARS:
                raise DataError(
                    f"{name}: column {header[i]!r} near row {first_row} holds a value of {longest} characters, "
                    f"over the limit of {MAX_ROW_CHARS} (MAX_ROW_CHARS)"
                )
            total += (pc.sum(lengths.take(column.indices.fill_null(0))).as_py() or 0) + 8 * len(column)
        return total

    def rows() -> Iterator[tuple[int, tuple]]:
        n = 0
        expanded = 0
        for batch in handle.iter_batches(batch_size=BATCH_ROWS):
            size = expanded_bytes(batch, n + 1)
            if size > MAX_BATCH_BYTES:
                raise DataError(
                    f"{name}: rows {n + 1}-{n + batch.num_rows} expand to {size >> 20} MiB of values, over the "
                    f"limit of {MAX_BATCH_BYTES >> 20} MiB per {BATCH_ROWS} rows (MAX_BATCH_BYTES)"
                )
            expanded += size
            if expanded > MAX_DECOMPRESSED_BYTES:
                raise DataError(
                    f"{name}: expands to more than {MAX_DECOMPRESSED_BYTES >> 30} GiB of values by row {n + batch.num_rows} "
                    "(limit MAX_DECOMPRESSED_BYTES); split the table or convert it to CSV"
                )
            columns = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
            for values in zip(*columns, strict=True):
                n += 1
                yield n, values

    return Table(name, header, rows(), line_numbers=False)


@contextlib.contextmanager
def open_table(path: str | Path, member: str | None = None, max_bytes: int | None = None) -> Iterator[Table]:
    """Open a CSV/TSV (optionally .gz), a Parquet file, or one table inside a zip, for streaming.

    A zip without `member` must hold exactly one table. Every problem is a one-line DataError
    naming the file; nothing is read into memory beyond one batch, no row beyond MAX_ROW_CHARS, and
    compressed input stops at MAX_DECOMPRESSED_BYTES or MAX_RATIO. `max_bytes` caps the text read
    from any kind of file (the ProteinGym reference, which is kept in memory).
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
            info = archive.getinfo(member)
            check_declared_size(name, info.file_size, info.compress_size)
            compressed = info.compress_size
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
            compressed = None
            if magic[:2] == b"\x1f\x8b":
                compressed = path.stat().st_size
                raw = stack.enter_context(gzip.GzipFile(fileobj=raw))
        if base.endswith((".parquet", ".pq")):
            raise DataError(f"{name}: Parquet inside a zip is not supported; extract it first")
        if compressed is not None or max_bytes is not None:
            limit = min(max_bytes or MAX_DECOMPRESSED_BYTES, MAX_DECOMPRESSED_BYTES)
            what = "this file" if max_bytes else "a compressed table; decompress it yourself to import it"
            raw = io.BufferedReader(_Capped(raw, name, limit, compressed, what))
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
