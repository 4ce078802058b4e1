"""The rows of `infra predict`: a core's result read as untrusted input, infra's own output written.

The core's result (docs/cli.md, "Predicting"; the contract of `runner.core.predict`) is a CSV of
`mutant`, the input's other columns (renamed `input_<name>` when they clash with an output name),
`sequence, prediction, error, measured, in_train`. The host knows what the header must be (it reads
the input's header itself) and reads the file row by row through a byte cap and a cell cap: a row
that is not that table, or not the request's row (INPUT's own mutant and cells, read by the host
alongside; a saturation's next substitution), refuses the whole result. What the user gets is written here, from the parsed rows: a
CSV with every text cell quoted and spreadsheet formulas neutralised, or a Parquet file of infra's
own schema (the container's Parquet is never read on the host).
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from runner import safefs
from runner.errors import ExperimentFailed, UsageError

OUTPUT_NAMES = ("sequence", "prediction", "error", "measured", "in_train", "std", "n", "ucb")
RESULT_TAIL = ["sequence", "prediction", "error", "measured", "in_train"]
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # OWASP: what makes a spreadsheet cell a formula
FLAGS = {"true": True, "false": False, "": None}
READ_CHUNK = 1 << 20
PARQUET_BATCH = 1 << 16  # rows per Parquet row group written


@dataclass(slots=True)
class Row:
    """One output row. `in_train` is a flag for one model, a member count for an ensemble; `std`,
    `n` and `ucb` are an ensemble's."""

    mutant: str
    inputs: list[str]
    sequence: str
    prediction: float | None
    error: str
    measured: bool | None
    in_train: bool | int | None
    std: float | None = None
    n: int | None = None
    ucb: float | None = None


@dataclass(frozen=True)
class Layout:
    """The output's columns: the kept input columns, and an ensemble's (and a ucb ranking's) extras."""

    inputs: tuple[str, ...] = ()
    ensemble: bool = False
    ucb: bool = False

    def header(self) -> list[str]:
        extra = (["std", "n"] if self.ensemble else []) + (["ucb"] if self.ucb else [])
        return ["mutant", *self.inputs, "sequence", "prediction", *extra, "error", "measured", "in_train"]


# --- the input's columns ----------------------------------------------------------------------------


def delimiter(path: Path, header: str) -> str:
    """The input's delimiter, as the core decides it (`runner.data.tables.sniff_delimiter`)."""
    from runner.data.tables import sniff_delimiter

    return sniff_delimiter(header, path.name)


def _open_input(source: Path, text_columns: list[str] | None = None):
    """A pyarrow CSV reader over INPUT exactly as the core opens it (`runner.core.predict.read_mutants`):
    the delimiter rule, compression by suffix, quoted newlines; with `text_columns` every one of them
    as text (no nulls: an empty cell is ''). ArrowException/OSError as raised."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    with pa.input_stream(str(source), compression="detect") as stream:
        head = stream.read(1 << 16).decode("utf-8", "replace")
    header = head.lstrip("\ufeff").splitlines()[0] if head.strip() else ""
    convert = None
    if text_columns is not None:
        convert = pacsv.ConvertOptions(
            column_types=dict.fromkeys(text_columns, pa.large_string()), strings_can_be_null=False
        )
    return pacsv.open_csv(
        pa.input_stream(str(source), compression="detect"),
        read_options=pacsv.ReadOptions(block_size=1 << 22),  # as the core reads it
        parse_options=pacsv.ParseOptions(delimiter=delimiter(source, header), newlines_in_values=True),
        convert_options=convert,
    )


def _unreadable(source: Path, exc: Exception) -> UsageError:
    return UsageError(f"input {source}: not a readable CSV/TSV ({exc}); give one with a 'mutant' column")


def input_columns(source: Path | None) -> tuple[str, ...]:
    """The input's columns other than `mutant`, in its order, as the result names them (`input_<name>`
    for one that clashes with an output name); none for a saturation. Read here, not from the result:
    the result is the container's, the input the invoker's."""
    if source is None:
        return ()
    import pyarrow as pa

    try:
        names = _open_input(source).schema.names
    except (OSError, pa.ArrowException) as exc:
        raise _unreadable(source, exc) from None
    if "mutant" not in names:
        raise UsageError(
            f"input {source}: no 'mutant' column (columns: {', '.join(names[:20]) or 'none'}); "
            "give one mutant per row, e.g. A23G:L45P ('' for the wild type)"
        )
    others = [n for n in names if n != "mutant"]
    kept = [f"input_{n}" if n in OUTPUT_NAMES else n for n in others]
    if len(set(kept)) != len(kept) or "mutant" in kept or len(others) != len(names) - 1:
        # as the core refuses it (runner.core.predict.output_column_names): two columns, one name
        raise UsageError(
            f"input {source}: two columns would share a name in the output (columns: {', '.join(names[:20])}); "
            "rename one (a column named like an output column becomes input_<name>)"
        )
    return tuple(kept)


def _input_batches(source: Path):
    """INPUT's record batches with every column as text, and the order to read them in: mutant first."""
    import pyarrow as pa

    try:
        names = _open_input(source).schema.names
        reader = _open_input(source, names)
        order = [names.index("mutant"), *(i for i, n in enumerate(names) if n != "mutant")]
        for batch in reader:
            yield batch, order
    except (OSError, pa.ArrowException) as exc:
        raise _unreadable(source, exc) from None


def input_rows(source: Path) -> Iterator[tuple[str, list[str]]]:
    """INPUT's rows as the core reads them: (the mutant cell, the other cells in the file's order), text
    exactly as in the file. What a result's `mutant` and input cells must equal, row by row."""
    for batch, order in _input_batches(source):
        columns = [batch.column(i).to_pylist() for i in order]
        for cells in zip(*columns, strict=True):
            yield cells[0], list(cells[1:])


def longest_input_cell(source: Path | None) -> int:
    """The most bytes any cell of INPUT has (0 for a saturation): a result's mutant and input cells are
    copies of INPUT's, so no honest result cell is longer than this or the template."""
    if source is None:
        return 0
    import pyarrow.compute as pc

    longest = 0
    for batch, _ in _input_batches(source):
        for column in batch.columns:
            if len(column):
                longest = max(longest, pc.max(pc.binary_length(column)).as_py() or 0)
    return longest


# --- a core's result, untrusted ---------------------------------------------------------------------


class Capped(io.RawIOBase):
    """A raw reader over `src` that fails once more than `limit` bytes came through (the file could
    still grow after it was measured, e.g. by a process the core left behind)."""

    def __init__(self, src, limit: int):
        self.src, self.left = src, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.src.read(min(len(buffer), self.left + 1))
        if len(data) > self.left:
            raise ExperimentFailed("the prediction's result grew past its size limit while it was read")
        self.left -= len(data)
        buffer[: len(data)] = data
        return len(data)


def open_result(scratch: Path, name: str, bound: int, refuse):
    """The core's result in `scratch` (this process's own folder) as a byte stream capped at `bound`:
    opened without following links or blocking; a regular file no larger than `bound`, else `refuse`."""
    try:
        fd = os.open(scratch / name, safefs.READ_FLAGS)
    except FileNotFoundError:
        raise refuse("is missing") from None
    except OSError as exc:  # ELOOP: a symbolic link
        raise refuse(f"cannot be opened as a file ({exc.strerror})") from None
    src = os.fdopen(fd, "rb")
    try:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise refuse(f"is {safefs._kind(st.st_mode)}")
        if st.st_size > bound:
            raise refuse(f"has {st.st_size:,} bytes, more than the {bound:,} its input can give")
    except BaseException:
        src.close()
        raise
    return io.BufferedReader(Capped(src, bound), READ_CHUNK)


@contextlib.contextmanager
def field_limit(chars: int):
    """The csv module's (process-wide) field size limit set to `chars` for the duration: once around a
    whole prediction's reading, never inside a result's generator (interleaved members would leave it
    changed). `chars` is `field_chars(...)`: one hostile cell cannot take more memory than that."""
    saved = csv.field_size_limit(chars)
    try:
        yield
    finally:
        csv.field_size_limit(saved)


FIELD_SLACK = 1 << 16  # an error text: a fixed message quoting at most a part of the mutant and the vocab


def field_chars(template_len: int, longest_cell: int) -> int:
    """The longest cell an honest result of this request can have: a sequence (at most the template),
    a copy of an INPUT cell, or an error message."""
    return max(template_len, longest_cell) + FIELD_SLACK


def read_result(stream, inputs: tuple[str, ...], refuse, sequence_max: int | None = None) -> Iterator[Row]:
    """The rows of a core's CSV result, each checked: the header `mutant`, `inputs`, RESULT_TAIL;
    as many cells as that a row; the prediction a finite number or empty (the core writes NaN as
    empty: inf or nan is not its table); the flags true, false or empty; the sequence at most
    `sequence_max` characters; anything else `refuse`s (raised from the iteration). A cell longer
    than the csv module's field limit (`field_limit`, set by the caller) refuses too. Closes
    `stream` when done."""
    expected = ["mutant", *inputs, *RESULT_TAIL]
    width, k = len(expected), len(inputs)
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="strict", newline="")
    rows = 0
    try:
        reader = csv.reader(text, strict=True)
        if next(reader, None) != expected:
            raise refuse(f"is not infra's prediction table (its header is not {','.join(expected)})")
        for cells in reader:
            rows += 1
            if len(cells) != width:
                raise refuse(f"is not infra's prediction table (data row {rows} has {len(cells)} cells, not {width})")
            sequence, prediction, error, measured, in_train = cells[k + 1 :]
            try:
                value = float(prediction) if prediction else None
                flags = FLAGS[measured], FLAGS[in_train]
            except ValueError:
                raise refuse(
                    f"is not infra's prediction table (data row {rows}: the prediction is not a number)"
                ) from None
            except KeyError:
                raise refuse(
                    f"is not infra's prediction table (data row {rows}: measured/in_train is not true, false or empty)"
                ) from None
            if value is not None and not math.isfinite(value):
                raise refuse(f"is not infra's prediction table (data row {rows}: the prediction {prediction[:20]!r} "
                             "is not a finite number)")  # fmt: skip
            if sequence_max is not None and len(sequence) > sequence_max:
                raise refuse(f"is not infra's prediction table (data row {rows}: its sequence has {len(sequence):,} "
                             f"residues, more than the template's {sequence_max:,})")  # fmt: skip
            yield Row(cells[0], cells[1 : k + 1], sequence, value, error, *flags)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise refuse(f"is not a UTF-8 CSV of infra's ({type(exc).__name__} near data row {rows}: "
                     f"{str(exc)[:80]})") from None  # fmt: skip
    finally:
        text.close()


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:39] + "…")


def input_checked(rows: Iterator[Row], source: Path, refuse) -> Iterator[Row]:
    """`rows` as they stream, each required to carry INPUT's row at its position: the same mutant and
    input cells (read by the host from INPUT, as the core reads it), and as many rows as INPUT has. A
    result that rewrote an id or a note, dropped, added or reordered a row is `refuse`d."""
    expected = input_rows(source)
    index = 0
    try:
        for row in rows:
            index += 1
            want = next(expected, None)
            if want is None:
                raise refuse(f"has more rows than INPUT ({index - 1:,}); it is not this input's prediction")
            if row.mutant != want[0] or row.inputs != want[1]:
                what = "mutant" if row.mutant != want[0] else "input columns"
                raise refuse(f"changed INPUT: data row {index:,}'s {what} differ from INPUT's row {index:,} "
                             f"(mutant {_short(row.mutant)}, INPUT has {_short(want[0])})")  # fmt: skip
            yield row
        if next(expected, None) is not None:
            raise refuse(f"has fewer rows ({index:,}) than INPUT; it is not this input's prediction")
    finally:
        expected.close()


def saturation_checked(rows: Iterator[Row], template: str | None, refuse) -> Iterator[Row]:
    """`rows` as they stream, each required to be the next single substitution of `template` (the
    request's source's, from config/predict.json): `<wild type><position><letter>` with the template's
    residue at that 1-based position, another letter, positions in order and no substitution twice.
    The letters themselves are the vocabulary's (the core's business: the host does not load it)."""
    last, seen = 0, set()
    for index, row in enumerate(rows, start=1):
        m = row.mutant
        digits = m[1:-1]
        pos = int(digits) if len(m) >= 3 and digits.isascii() and digits.isdigit() and digits[0] != "0" else 0
        fine = template is not None and 1 <= pos <= len(template) and pos >= last
        fine = fine and m[0] == template[pos - 1] and m[-1].isalpha() and m[-1] != m[0].upper()
        if fine and pos != last:
            last, seen = pos, set()
        if not fine or m[-1] in seen:
            raise refuse(f"is not this saturation's table (data row {index:,}: {_short(m)} is not the next single "
                         "substitution of the template)")  # fmt: skip
        seen.add(m[-1])
        yield row


# --- infra's output ---------------------------------------------------------------------------------


def neutral(cell: str) -> str:
    """A text cell a spreadsheet would run as a formula, prefixed with a quote (OWASP's advice)."""
    return "'" + cell if cell.startswith(FORMULA_STARTS) else cell


def quoted(cell: str) -> str:
    return '"' + neutral(cell).replace('"', '""') + '"'


def _number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _flag(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(int(value))


class CsvOut:
    """infra's CSV: text cells always quoted (formulas neutralised), numbers bare (Python's shortest
    form), flags `true`/`false`, an ensemble's counts bare integers, nothing where a value is absent."""

    def __init__(self, fh, layout: Layout):
        self.layout = layout
        self.sink = io.TextIOWrapper(fh, encoding="utf-8", newline="", write_through=False)
        self.sink.write(",".join(quoted(c) for c in layout.header()) + "\n")

    def write(self, row: Row) -> None:
        cells = [quoted(row.mutant), *(quoted(c) for c in row.inputs), quoted(row.sequence), _number(row.prediction)]
        if self.layout.ensemble:
            cells += [_number(row.std), "" if row.n is None else str(row.n)]
        if self.layout.ucb:
            cells.append(_number(row.ucb))
        cells += [quoted(row.error), _flag(row.measured), _flag(row.in_train)]
        self.sink.write(",".join(cells) + "\n")

    def close(self) -> None:
        self.sink.flush()
        self.sink.detach()


class ParquetOut:
    """infra's Parquet: text large_string (error: string), numbers float64, n int64, flags bool (an
    ensemble's in_train: int64), written in row groups of PARQUET_BATCH rows."""

    def __init__(self, fh, layout: Layout):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.layout = layout
        text, number = pa.large_string(), pa.float64()
        fields = [("mutant", text), *((c, text) for c in layout.inputs), ("sequence", text), ("prediction", number)]
        fields += [("std", number), ("n", pa.int64())] if layout.ensemble else []
        fields += [("ucb", number)] if layout.ucb else []
        fields += [("error", pa.string()), ("measured", pa.bool_())]
        fields += [("in_train", pa.int64() if layout.ensemble else pa.bool_())]
        self.schema = pa.schema(fields)
        self.writer = pq.ParquetWriter(fh, self.schema)
        self.columns: list[list] = [[] for _ in fields]

    def write(self, row: Row) -> None:
        values = [row.mutant, *row.inputs, row.sequence or None, row.prediction]
        values += [row.std, row.n] if self.layout.ensemble else []
        values += [row.ucb] if self.layout.ucb else []
        values += [row.error or None, row.measured, row.in_train]
        for column, value in zip(self.columns, values, strict=True):
            column.append(value)
        if len(self.columns[0]) >= PARQUET_BATCH:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.columns[0]:
            self.writer.write_table(pa.table(self.columns, schema=self.schema))
            self.columns = [[] for _ in self.columns]

    def close(self) -> None:
        self._flush()
        self.writer.close()


def writer_for(fmt: str, fh, layout: Layout):
    return ParquetOut(fh, layout) if fmt == "parquet" else CsvOut(fh, layout)


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
