"""The rows of `infra predict`: a core's result read as untrusted input, infra's own output written.

The core's result (docs/cli.md, "Predicting"; the contract of `runner.core.predict`) is a CSV of
`mutant`, the input's other columns (renamed `input_<name>` when they clash with an output name),
`sequence, prediction, error, measured, in_train`. The host knows what the header must be (it reads
the input's header itself) and reads the file row by row through a byte cap: a row that is not
that table refuses the whole result. What the user gets is written here, from the parsed rows: a
CSV with every text cell quoted and spreadsheet formulas neutralised, or a Parquet file of infra's
own schema (the container's Parquet is never read on the host).
"""

from __future__ import annotations

import csv
import io
import math
import os
import stat
import sys
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
    """As the core decides (`runner.core.predict._delimiter`): a .tsv/.tab name, or a header with tabs and no comma."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".tsv", ".tab")):
        return "\t"
    return "\t" if "\t" in header and "," not in header else ","


def input_columns(source: Path | None) -> tuple[str, ...]:
    """The input's columns other than `mutant`, in its order, as the result names them (`input_<name>`
    for one that clashes with an output name); none for a saturation. Read here, not from the result:
    the result is the container's, the input the invoker's."""
    if source is None:
        return ()
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        with pa.input_stream(str(source), compression="detect") as stream:
            head = stream.read(1 << 16).decode("utf-8", "replace")
        header = head.lstrip("\ufeff").splitlines()[0] if head.strip() else ""
        reader = pacsv.open_csv(
            pa.input_stream(str(source), compression="detect"),
            read_options=pacsv.ReadOptions(block_size=1 << 22),  # as the core reads it
            parse_options=pacsv.ParseOptions(delimiter=delimiter(source, header), newlines_in_values=True),
        )
        names = reader.schema.names
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"input {source}: not a readable CSV/TSV ({exc}); give one with a 'mutant' column") from None
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


def read_result(stream, inputs: tuple[str, ...], refuse) -> Iterator[Row]:
    """The rows of a core's CSV result, each checked: the header `mutant`, `inputs`, RESULT_TAIL;
    as many cells as that a row; the prediction a number or empty; the flags true, false or empty;
    anything else `refuse`s (raised from the iteration). Closes `stream` when done."""
    expected = ["mutant", *inputs, *RESULT_TAIL]
    width, k = len(expected), len(inputs)
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="strict", newline="")
    saved = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)  # the whole file is bounded already; a mutant's text may be long
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
            yield Row(cells[0], cells[1 : k + 1], sequence, value, error, *flags)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise refuse(f"is not a UTF-8 CSV ({type(exc).__name__} near data row {rows})") from None
    finally:
        csv.field_size_limit(saved)
        text.close()


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
