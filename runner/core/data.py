"""The selected variants of a plan, read from the mutation database and encoded as uint8 tokens.

`load_variants(plan.data, plan.vocab)` turns the typed `data` section of a plan
(`runner.plan.models.DataSpec`, whose where-clause shapes the model has already checked) into one
SQL query (columns checked against the real tables, values always bound as parameters), reads the
rows from a read-only connection, builds the mutated sequences as a token matrix
(runner.core.variants) and returns a `VariantSet`. The database's bytes are never changed, also in
WAL mode and when its folder is read-only.

Example::

    vs = load_variants(plan.data, plan.vocab, db_path="dms.sqlite")
    vs.tokens.shape, vs.target.dtype        # (N, L), float32
    vs.query                                # {"sql": "...", "params": [...]} -> config/query.json
"""

from __future__ import annotations

import logging
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from runner.core.variants import ROW_SEP, MutantText, apply_mutants
from runner.core.vocab import BaseVocabProcessor, get_vocab_processor
from runner.data.db import DbLayout, check_database, connect_readonly, read_layout, readonly_uri
from runner.errors import DataError
from runner.plan.models import DataSpec, VocabSpec

log = logging.getLogger(__name__)
ROW_SEP_BYTE = ROW_SEP[0]

# where-op → SQL; which value each op takes is WhereClause's rule (runner.plan.models)
SCALAR_OPS = {"=": "=", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">=", "like": "LIKE"}
LIST_OPS = {"in": "IN", "not_in": "NOT IN"}
NULL_OPS = {"is_null": "IS NULL", "not_null": "IS NOT NULL"}
SQLITE_MAX_PARAMS = 32766  # SQLITE_MAX_VARIABLE_NUMBER since 3.32


@dataclass
class VariantSet:
    """The selection of a plan, row-aligned across every array (row i is `ids[i]`)."""

    ids: np.ndarray  # int64 mutations.id
    tokens: np.ndarray  # uint8 N × L, right-padded with vocab.pad_id
    target: np.ndarray  # float32, data.target on its original scale
    mut_num: np.ndarray  # int32 substitutions per variant (0 = wild type)
    first_pos: np.ndarray  # int32 smallest mutated 1-based position, 0 for the wild type
    source: np.ndarray  # int32 code into source_names / templates
    source_names: list[str]
    templates: list[str]
    lengths: np.ndarray  # int32 sequence length per row (its template's length)
    frame: pd.DataFrame  # id, source_text, mutant, mut_num, DMS_score, DMS_score_bin, extras…, sequence
    query: dict[str, Any]  # {"sql": str, "params": list} exactly as executed
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows left out (nan_target, mismatch…)
    vocab: BaseVocabProcessor | None = None
    target_name: str = "DMS_score"
    # data.covariates as read: float64 N × K (K = 0 without covariates), finite in every row
    covariates: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    covariate_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.ids.size)

    @property
    def extra_columns(self) -> list[str]:
        """The `mutations` columns beyond the standard schema (e.g. predefined split columns)."""
        standard = {"id", "source_text", "mutant", "mut_num", "DMS_score", "DMS_score_bin", "sequence"}
        return [c for c in self.frame.columns if c not in standard]


def sequences_from_tokens(
    tokens: np.ndarray, vocab: BaseVocabProcessor, lengths: np.ndarray | None = None
) -> pd.Series:
    """The sequences of a token matrix as a pandas string Series, built without a per-row loop.

    The letters are gathered from the matrix into one buffer and wrapped as an Arrow string array
    (offsets from `lengths`, or from the padding when `lengths` is None), so no Python string is
    made per variant until someone asks for one.
    """
    tokens = np.asarray(tokens, dtype=np.uint8)
    if lengths is None:
        lengths = (tokens != vocab.pad_id).sum(axis=1)
    return pd.Series(_ascii_to_strings(vocab.inverse[tokens], lengths), name="sequence")


def _ascii_to_strings(ascii: np.ndarray, lengths: np.ndarray) -> pd.arrays.ArrowExtensionArray:
    """Wrap an N × L ASCII matrix (right-padded) as an Arrow string array of the first lengths[i] letters."""
    ascii = np.ascontiguousarray(ascii, dtype=np.uint8)
    n, width = ascii.shape
    lengths = np.asarray(lengths, dtype=np.int64)
    # zero-copy when nothing is padded; padding is always on the right, so masking keeps row order
    full = bool(n) and bool(np.all(lengths == width))
    data = ascii.reshape(-1) if full else ascii[np.arange(width)[None, :] < lengths[:, None]]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    arr = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))
    return pd.arrays.ArrowExtensionArray(arr)


def open_database(path: Path) -> sqlite3.Connection:
    """Open the mutation database read-only (see `runner.data.db.connect_readonly`), or raise DataError."""
    problem = check_database(path)
    if problem:
        raise DataError(f"data.db: {problem}")
    return connect_readonly(path)


def _datasets(data: DataSpec) -> list[str]:
    return [data.dataset] if isinstance(data.dataset, str) else list(data.dataset or [])


def _bound(value: Any) -> Any:
    # a boolean binds as SQLite's integer; query.json shows what was bound
    return int(value) if isinstance(value, bool) else value


# Frame columns an extra mutations column must not overwrite (it stays usable in data.where).
FRAME_NAMES = {"id", "source_text", "mutant", "mut_num", "DMS_score", "DMS_score_bin", "sequence", "source_ref"}
# mut_num derived from the mutant text in SQL, for data.where when the column is absent or NULL
DERIVED_MUT_NUM = (
    "(CASE WHEN m.mutant IS NULL THEN NULL WHEN m.mutant = '' THEN 0 "
    "ELSE length(m.mutant) - length(replace(m.mutant, ':', '')) + 1 END)"
)


def build_query(data: DataSpec, layout: DbLayout) -> tuple[str, list[Any], list[str]]:
    """The SELECT for `data.*` and its parameters, plus the extra mutations columns it returns.

    Pure: takes the database's layout (`runner.data.db.read_layout`) so it can be tested without a
    database. Identifiers only ever come from the layout; every value is a bound parameter. What is
    checked here is what needs the database: the target and where columns, and SQLite's parameter
    limit. The reference to `sources` comes back as `source_ref` whatever the database calls it
    (`source`, or `source_id` in databases of infra 0.1); a missing `DMS_score_bin` column reads as NULL.
    """
    key = f'm."{layout.source_key}"'
    if data.target == "DMS_score_bin" and not layout.has_bin:
        raise DataError("data.target: the mutations table has no DMS_score_bin column; use target DMS_score")
    extras = [c for c in layout.extras if c not in FRAME_NAMES]
    for i, column in enumerate(data.covariates):
        if column not in extras:
            raise DataError(
                f"data.covariates[{i}]: {column!r} is not an extra column of the mutations table "
                f"(extra columns: {', '.join(extras) or 'none'}); import it with 'infra data import --extra-columns'"
            )
    select = ["m.id", f"{key} AS source_ref", "m.mutant", "m.DMS_score"]
    select.append("m.DMS_score_bin" if layout.has_bin else "NULL AS DMS_score_bin")
    select += [f'm."{c}"' for c in extras]
    clauses: list[str] = []
    params: list[Any] = []

    # Filters on `sources` become `m.source IN (SELECT id FROM sources WHERE ...)`: evaluated
    # once, where a JOIN would cost a B-tree seek per row (a third of the read time on 1M rows).
    datasets = _datasets(data)
    if datasets:
        clauses.append(f"{key} IN (SELECT id FROM sources WHERE source_text IN ({', '.join('?' * len(datasets))}))")
        params += datasets
    for i, clause in enumerate(data.where):
        ref, on_sources = _column_ref(clause.column, layout, f"data.where[{i}].column")
        cond, values = _condition(ref, clause.op, clause.value)
        clauses.append(f"{key} IN (SELECT id FROM sources WHERE {cond})" if on_sources else cond)
        params += values
    if len(params) > SQLITE_MAX_PARAMS:
        raise DataError(f"data.where: {len(params)} values exceed SQLite's limit of {SQLITE_MAX_PARAMS}; use fewer")

    sql = f"SELECT {', '.join(select)} FROM mutations AS m"
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += " ORDER BY m.id"
    if data.limit is not None:
        sql += " LIMIT ?"
        params.append(data.limit)
    return sql, params, extras


def _column_ref(column: str, layout: DbLayout, key: str) -> tuple[str, bool]:
    """The SQL reference of a where column, and whether it is a `sources` column; DataError when unknown."""
    if column == "mut_num":  # stored counts may be NULL (or the column absent): derive those
        return (f'coalesce(m."mut_num", {DERIVED_MUT_NUM})' if layout.has_mut_num else DERIVED_MUT_NUM), False
    if column in layout.mutation_columns:
        return f'm."{column}"', False
    if column in layout.source_columns:
        return f'"{column}"', True
    raise DataError(f"{key}: unknown column {column!r}; the database has: {', '.join(layout.filter_columns)}")


def _condition(ref: str, op: str, value: Any) -> tuple[str, list[Any]]:
    """SQL for one where clause whose value already fits its op (WhereClause), and its parameters."""
    if op in NULL_OPS:
        return f"{ref} {NULL_OPS[op]}", []
    if op in LIST_OPS:
        return f"{ref} {LIST_OPS[op]} ({', '.join('?' * len(value))})", [_bound(v) for v in value]
    if op == "between":
        return f"{ref} BETWEEN ? AND ?", [_bound(v) for v in value]
    return f"{ref} {SCALAR_OPS[op]} ?", [_bound(value)]


def _describe_selection(data: DataSpec) -> str:
    parts = [f"dataset={data.dataset!r}"] if data.dataset else []
    parts += [f"where[{i}]={c.column} {c.op} {c.value!r}" for i, c in enumerate(data.where)]
    return ", ".join(parts) or "no filters"


def _read_columns(conn: sqlite3.Connection, sql: str, params: list[Any], extras: list[str], aggregate: bool = True):
    """Run the selection and return its columns as arrays: (ids, source_ids, MutantText, score, score_bin, extras).

    The fast path wraps the selection in one aggregate query, so SQLite builds each column as one
    text in C instead of Python building a tuple per row (the per-row tuples dominate a naive
    read). Aggregates of one query see the rows in the same order, so the columns stay aligned;
    scores travel with 17 significant digits, which round-trips a double exactly. A selection too
    big for one SQLite string falls back to reading rows.
    """
    if aggregate:
        # NULL mutant -> '?' (reported as malformed); text in a score column -> 'not-a-number' (a DataError)
        agg = (
            "SELECT count(*), group_concat(ifnull(id, 'NULL')), group_concat(ifnull(source_ref, 'NULL')), "
            "group_concat(ifnull(mutant, '?'), char(10)), "
            f"group_concat({_number_text('DMS_score')}), group_concat({_number_text('DMS_score_bin')}) FROM ({sql})"
        )
        try:
            n, ids_text, src_text, mutants, score_text, bin_text = conn.execute(agg, params).fetchone()
        except (sqlite3.DataError, sqlite3.OperationalError, MemoryError) as exc:
            log.info("aggregate read failed (%s); reading rows instead", exc)
        else:
            if n == 0:
                return None
            ids = _split_numbers(ids_text, pa.int64())
            source_ids = _split_numbers(src_text, pa.int64())
            score = _split_numbers(score_text, pa.float64())
            score_bin = _split_numbers(bin_text, pa.float64())
            if not ids.size == source_ids.size == score.size == score_bin.size == n:
                raise DataError(
                    "data: the database returned columns of different lengths; is a score column not numeric?"
                )
            text = MutantText.from_joined(mutants, int(n))
            extra_values = _read_extras(conn, sql, params, extras) if extras else []
            return ids, source_ids, text, score, score_bin, extra_values
    rows = conn.execute(sql, params).fetchall()
    if not rows:
        return None
    table = np.array(rows, dtype=object)
    del rows
    ids = table[:, 0].astype(np.int64)
    source_ids = table[:, 1].astype(np.int64)
    text = MutantText.from_strings(table[:, 2])
    score = _float_column(table[:, 3], "DMS_score")
    score_bin = _float_column(table[:, 4], "DMS_score_bin")
    return ids, source_ids, text, score, score_bin, [table[:, 5 + j] for j in range(len(extras))]


PARALLEL_READ_MIN_IDS = 262_144  # below this id span one reader is as fast as several
PARALLEL_READ_MAX_PARTS = 4  # measured: 2 readers halve a 1 M-row read on 2 cores; more cores, more parts


def read_parts(
    conn: sqlite3.Connection, data: DataSpec, layout: DbLayout | None = None
) -> list[tuple[int, int]] | None:
    """Half-open id ranges splitting `mutations` for parallel readers, or None for one reader.

    One reader when the plan has a LIMIT (it applies to the whole ordered selection), when the id
    span is small, when this process may use only one CPU, or when `mutations.id` is not SQLite's
    row id (an untyped `id` as the lab's DDL makes it: each range would scan the whole table).
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if data.limit is not None or cpus < 2 or (layout is not None and not layout.id_is_rowid):
        return None
    # two subqueries: SQLite answers a lone min()/max() of the rowid from the B-tree's ends, but
    # scans the whole table for "SELECT min(id), max(id)"
    low, high = conn.execute("SELECT (SELECT min(id) FROM mutations), (SELECT max(id) FROM mutations)").fetchone()
    if low is None or high - low + 1 < PARALLEL_READ_MIN_IDS:
        return None
    k = min(cpus, PARALLEL_READ_MAX_PARTS)
    bounds = [low + (high + 1 - low) * i // k for i in range(k)] + [high + 1]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


def _db_signature(path: Path) -> tuple:
    """What changes when the database file (or its WAL) is written: size and mtime of both."""
    sig = []
    for p in (path, path.with_name(path.name + "-wal")):
        try:
            st = p.stat()
            sig.append((st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            sig.append(None)
    return tuple(sig)


def _fetch_arrow(adbc, uri: str, sql: str, params: list[Any], id_range: tuple[int, int] | None) -> pa.Table:
    query, args = sql, tuple(params)
    if id_range is not None:
        # SQLite pushes this down to a rowid range search of `mutations` (EXPLAIN QUERY PLAN)
        query, args = f"SELECT * FROM ({sql}) WHERE id >= ? AND id < ?", (*args, *id_range)
    with adbc.connect(uri) as conn, conn.cursor() as cur:
        cur.execute(query, args)
        return cur.fetch_arrow_table()


def _read_columns_arrow(
    path: Path, sql: str, params: list[Any], extras: list[str], parts: list[tuple[int, int]] | None = None
):
    """Fastest path: the selection as Arrow through the ADBC SQLite driver (a C reader that builds
    columns without a Python object per row; about 3x the aggregate read on 1 M rows). With
    `parts` (see `read_parts`) each id range is read by its own connection in a thread — the driver
    releases the GIL — and the parts are joined in id order.

    Returns the same tuple as `_read_columns`, or None whenever this path does not apply — the
    driver is not installed, the driver fails (it infers column types from the first rows, so a
    column mixing types can fail), parts disagree on a column's type, the file changed during a
    parallel read (the parts might then come from different snapshots), or the result needs the
    checks of the sqlite3 path (NULL or non-ASCII mutants, non-numeric scores, an empty selection).
    The caller then reads with sqlite3 on one connection.
    """
    try:
        import adbc_driver_sqlite.dbapi as adbc
    except ImportError:
        return None
    uri = readonly_uri(path)
    try:
        if parts:
            before = _db_signature(path)
            with ThreadPoolExecutor(len(parts), thread_name_prefix="infra-read") as pool:
                tables = list(pool.map(lambda r: _fetch_arrow(adbc, uri, sql, params, r), parts))
            if _db_signature(path) != before:
                log.info("%s changed during the parallel read; reading it again with sqlite3", path)
                return None
            tables = [t for t in tables if t.num_rows] or tables[:1]
            table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
        else:
            table = _fetch_arrow(adbc, uri, sql, params, None)
    except Exception as exc:  # any driver-level problem: the sqlite3 path reads the same rows
        log.info("ADBC read not used (%s: %s); reading with sqlite3", type(exc).__name__, exc)
        return None
    numeric = (pa.types.is_integer, pa.types.is_floating, pa.types.is_null)
    mutant = table.column("mutant").combine_chunks() if table.num_rows else None
    if (
        mutant is None
        or mutant.null_count
        or not pa.types.is_string(mutant.type)
        or table.column("id").null_count
        or table.column("source_ref").null_count
        or not all(any(check(table.column(c).type) for check in numeric) for c in ("DMS_score", "DMS_score_bin"))
    ):
        return None
    offsets = np.frombuffer(mutant.buffers()[1], dtype=np.int32)[mutant.offset : mutant.offset + len(mutant) + 1]
    letters = np.frombuffer(mutant.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    if letters.size and letters.max() > 127:
        return None
    # the parser's layout: every mutant followed by a newline, in one buffer
    n = len(mutant)
    buf = np.full(letters.size + n, ROW_SEP_BYTE, dtype=np.uint8)
    is_text = np.ones(buf.size, dtype=bool)
    is_text[(offsets[1:] - offsets[0]) + np.arange(n)] = False
    buf[is_text] = letters

    def floats(name: str) -> np.ndarray:
        return pc.cast(table.column(name), pa.float64()).to_numpy(zero_copy_only=False)

    extra_values = [np.array(table.column(c).to_pylist(), dtype=object) for c in extras]
    return (
        table.column("id").to_numpy(),
        table.column("source_ref").to_numpy(),
        MutantText(buf, n),
        floats("DMS_score"),
        floats("DMS_score_bin"),
        extra_values,
    )


def _number_text(column: str) -> str:
    # reals with 17 significant digits (exact); integers as SQLite prints them (cheaper than printf)
    return (
        f"CASE typeof({column}) WHEN 'real' THEN printf('%!.17g', {column}) WHEN 'integer' THEN {column} "
        f"WHEN 'null' THEN 'nan' ELSE 'not-a-number' END"
    )


def _split_numbers(text: str, type_: pa.DataType) -> np.ndarray:
    """Parse a comma-separated list of numbers ('nan' allowed for floats) with Arrow's C parser."""
    parts = pc.split_pattern(pa.array([text], type=pa.large_string()), ",")[0].values
    try:
        return pc.cast(parts, type_).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid as exc:
        raise DataError(
            f"data: a score or id column holds a value that is not a number ({exc}); re-import the data"
        ) from None


def _float_column(values: np.ndarray, name: str) -> np.ndarray:
    try:
        return np.array(values, dtype=np.float64)  # None -> nan
    except (TypeError, ValueError):
        raise DataError(f"data: column {name} holds a value that is not a number; re-import the data") from None


def _read_extras(conn: sqlite3.Connection, sql: str, params: list[Any], extras: list[str]) -> list[np.ndarray]:
    cols = ", ".join(f'"{c}"' for c in extras)  # names come from PRAGMA table_info
    table = np.array(conn.execute(f"SELECT {cols} FROM ({sql})", params).fetchall(), dtype=object)
    return [table[:, j] for j in range(len(extras))]


def _extra_column(values: np.ndarray) -> Any:
    """An extra column as the narrowest pandas type that holds it (numbers stay numbers, text is str)."""
    return pd.Series(values, dtype=object).infer_objects().array


def load_variants(
    data: DataSpec, vocab: VocabSpec | None = None, *, db_path: str | Path | None = None, aggregate_read: bool = True
) -> VariantSet:
    """Read, check and encode the variants a plan's `data` section selects, in vocabulary `vocab`.

    `db_path` overrides `data.db` (the container sees the DB at its mount point). Raises DataError
    for an unusable database, an unknown column or dataset, an empty selection, and (with
    `data.on_mismatch="error"`) a mutant that does not fit its template. `aggregate_read=False`
    forces the plain row-by-row read (the fallback; tests compare both).
    """
    vocab = vocab or VocabSpec()
    processor = get_vocab_processor(vocab.name, **dict(vocab.params))
    path = Path(db_path if db_path is not None else data.db)
    rows, query, sources = _read_selection(data, path, aggregate_read)
    ids = rows.ids
    _check_ids(ids, path)
    target_raw = rows.score if data.target == "DMS_score" else rows.score_bin
    select, dropped = _usable_targets(target_raw, data)
    if data.sample is not None:
        select, query["sample"] = sample_rows(ids, select, data.sample, data.sample_seed)
    codes, source_names, templates = _source_codes(ids, rows.source_ids, sources, path)
    result = _encode(rows, codes, source_names, templates, processor, select, data)
    dropped.update(result.dropped)
    sel = np.flatnonzero(result.keep)
    if sel.size == 0:
        raise DataError(
            f"data: the selection is empty: every row of {_describe_selection(data)} was dropped "
            f"({dropped}); check the templates or data.on_mismatch"
        )
    covariates = covariate_matrix(rows, query["extras"], sel, data)
    template_lengths = np.array([len(t) for t in templates], dtype=np.int32)
    lengths = template_lengths[codes[sel]]
    frame = _frame(rows, sel, codes, source_names, result.mut_num, query["extras"])
    frame["sequence"] = _ascii_to_strings(result.ascii, lengths)
    log.info(
        "selected %d variants from %s (%d sources, length %d); dropped %s",
        sel.size,
        path,
        len(source_names),
        result.tokens.shape[1],
        dropped or "none",
    )
    return VariantSet(
        ids=ids[sel],
        tokens=result.tokens,
        target=target_raw[sel].astype(np.float32),
        mut_num=result.mut_num,
        first_pos=result.first_pos,
        source=codes[sel].astype(np.int32),
        source_names=source_names,
        templates=templates,
        lengths=lengths,
        frame=frame,
        query={k: query[k] for k in ("sql", "params", "sample") if k in query},
        dropped=dropped,
        vocab=processor,
        target_name=data.target,
        covariates=covariates,
        covariate_names=list(data.covariates),
    )


def covariate_matrix(rows: Rows, extras: list[str], sel: np.ndarray, data: DataSpec) -> np.ndarray:
    """`data.covariates` of the selected rows as float64 N × K; DataError for a value that is not a
    number or is missing. Missing values are refused, never imputed: a filled-in value would silently
    change what the model's score of that row means (docs/plans.md)."""
    out = np.zeros((sel.size, len(data.covariates)), dtype=np.float64)
    for j, column in enumerate(data.covariates):
        values = rows.extra_values[extras.index(column)][sel]
        try:
            out[:, j] = np.asarray(values, dtype=object).astype(np.float64)  # NULL (None) -> NaN
        except (TypeError, ValueError):
            raise DataError(
                f"data.covariates: column {column!r} holds a value that is not a number; covariates must be "
                "numeric columns (re-import it with numbers)"
            ) from None
        missing = ~np.isfinite(out[:, j])
        if missing.any():
            first = int(rows.ids[sel][np.flatnonzero(missing)[0]])
            raise DataError(
                f"data.covariates: column {column!r} is missing (NULL, NaN or infinite) in {int(missing.sum())} of "
                f"the {sel.size} selected rows (first: id {first}); missing values are not imputed: leave those "
                f'rows out with data.where {{"column": "{column}", "op": "not_null"}}, or re-import the column '
                "with a value for every row"
            )
    return out


# splitmix64 (Steele, Lea & Flood 2014; the seeding generator of Java's SplittableRandom): a bijection
# of 64-bit integers whose outputs look independent for consecutive inputs. Unsigned 64-bit arithmetic
# wraps the same way on every platform, so a sample is the same everywhere.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def sample_keys(ids: np.ndarray, seed: int) -> np.ndarray:
    """One pseudo-random uint64 per id, a function of the id and `seed` only (splitmix64)."""
    with np.errstate(over="ignore"):  # wrapping is the point
        z = np.asarray(ids).astype(np.uint64) + _GOLDEN * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def sample_rows(ids: np.ndarray, select: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, dict[str, int]]:
    """`data.sample`: of the `select`ed rows, the `n` whose ids have the smallest `sample_keys` (all of
    them when there are no more than `n`); the new mask and what config/query.json records.

    A row's place depends on its id and the seed alone, not on the rows around it: the same ids give
    the same sample on every platform, and a sample of n rows holds the sample of fewer rows.
    """
    candidates = np.flatnonzero(select)
    record = {"n": int(n), "seed": int(seed), "from": int(candidates.size)}
    if n >= candidates.size:
        log.info("data.sample %d: the selection has %d usable rows; all are kept", n, candidates.size)
        return select, record
    keys = sample_keys(ids[candidates], seed)
    chosen = candidates[np.argpartition(keys, n - 1)[:n]]
    out = np.zeros_like(select)
    out[chosen] = True
    log.info("data.sample: %d of %d usable rows (seed %d)", n, candidates.size, seed)
    return out, record


class Rows(NamedTuple):
    """The selected rows' columns as read, row-aligned (what `_read_columns` returns)."""

    ids: np.ndarray
    source_ids: np.ndarray
    text: MutantText
    score: np.ndarray
    score_bin: np.ndarray
    extra_values: list[np.ndarray]


def _read_selection(data: DataSpec, path: Path, aggregate_read: bool) -> tuple[Rows, dict, list[tuple]]:
    """The selected rows, the query as run (sql, params, extras) and the `sources` rows (id,
    source_text, template), from one read-only connection."""
    conn = open_database(path)
    try:
        layout = read_layout(conn, f"data.db: {path}")
        sql, params, extras = build_query(data, layout)
        sources = conn.execute("SELECT id, source_text, template FROM sources ORDER BY id").fetchall()
        known = {name for _, name, _ in sources}
        unknown = [d for d in _datasets(data) if d not in known]
        if unknown:
            raise DataError(
                f"data.dataset: {', '.join(map(repr, unknown))} not in {path}; "
                f"sources there: {', '.join(sorted(known)) or 'none'}"
            )
        try:
            columns = None
            if aggregate_read:
                columns = _read_columns_arrow(path, sql, params, extras, read_parts(conn, data, layout))
            if columns is None:
                columns = _read_columns(conn, sql, params, extras, aggregate=aggregate_read)
        except sqlite3.Error as exc:
            raise DataError(f"data: reading {path} failed: {exc}") from None
    finally:
        conn.close()
    if columns is None:
        raise DataError(
            f"data: the selection is empty: {_describe_selection(data)} matched no rows in {path}; "
            "check data.dataset / data.where"
        )
    return Rows(*columns), {"sql": sql, "params": params, "extras": extras}, sources


def _check_ids(ids: np.ndarray, path: Path) -> None:
    # the read is ordered by id: a repeat or a step back means mutations.id is not a row id
    if ids.size > 1 and np.any(ids[1:] <= ids[:-1]):
        dup = ids[1:][ids[1:] <= ids[:-1]][0]
        raise DataError(
            f"data: mutations.id of {path} is not a unique row id (id {dup} repeats or is out of order); "
            "every row needs its own integer id"
        )


def _usable_targets(target_raw: np.ndarray, data: DataSpec) -> tuple[np.ndarray, dict[str, int]]:
    """Rows whose target can be trained on, and the count left out per reason."""
    dropped: dict[str, int] = {}
    # ±inf cannot be trained on (the loss becomes NaN): such rows are always left out and counted
    infinite = np.isinf(target_raw)
    if infinite.any():
        dropped["non_finite_target"] = int(infinite.sum())
        log.warning("dropped %d rows whose %s is infinite", dropped["non_finite_target"], data.target)
    select = ~infinite
    if data.drop_nan:
        nan = np.isnan(target_raw)
        if nan.any():
            dropped["nan_target"] = int(nan.sum())
            log.info("dropped %d rows whose %s is NULL/NaN", dropped["nan_target"], data.target)
        select &= ~nan
    if not select.any():
        raise DataError(
            f"data: the selection is empty: every one of the {target_raw.size} rows selected by "
            f"{_describe_selection(data)} has a NULL/NaN or infinite {data.target}; check data.target / data.where"
        )
    return select, dropped


def _encode(rows: Rows, codes, source_names, templates, processor, select: np.ndarray, data: DataSpec):
    """The mutated sequences of the `select`ed rows as tokens (`runner.core.variants.apply_mutants`)."""
    return apply_mutants(
        templates,
        codes,
        rows.text,
        processor,
        row_ids=rows.ids,
        source_names=source_names,
        on_mismatch=data.on_mismatch,
        select=select,
        want_ascii=True,
    )


def _source_codes(ids: np.ndarray, source_ids: np.ndarray, sources: list[tuple], path: Path):
    """Source codes 0..S-1 per row in order of sources.id (only the sources the selection touches),
    with those sources' names and templates."""
    by_id = {sid: (name, template) for sid, name, template in sources}
    used, codes = np.unique(source_ids, return_inverse=True)
    orphans = [int(s) for s in used if int(s) not in by_id]
    if orphans:
        first = int(ids[np.flatnonzero(source_ids == orphans[0])[0]])
        raise DataError(
            f"data: row id {first} of {path} refers to source {orphans[0]}, which is not in sources; re-import the data"
        )
    return codes, [by_id[int(s)][0] for s in used], [by_id[int(s)][1] for s in used]


def _frame(rows: Rows, sel: np.ndarray, codes, source_names, mut_num, extras: list[str]) -> pd.DataFrame:
    """The rows `sel` as data/selected.parquet holds them (the sequence column is added after)."""
    text = rows.text
    mutant_arr = pa.LargeStringArray.from_buffers(
        len(text), pa.py_buffer(text.offsets()), pa.py_buffer(np.ascontiguousarray(text.letters()))
    )
    if sel.size != len(text):
        mutant_arr = mutant_arr.take(pa.array(sel))
    bins = rows.score_bin[sel]
    frame_cols: dict[str, Any] = {
        "id": rows.ids[sel],
        "source_text": pd.Categorical.from_codes(codes[sel], categories=source_names),
        "mutant": pd.arrays.ArrowExtensionArray(mutant_arr),
        "mut_num": mut_num,
        "DMS_score": rows.score[sel],
        "DMS_score_bin": pd.arrays.IntegerArray(np.nan_to_num(bins).astype(np.int64), np.isnan(bins)),
    }
    for name, values in zip(extras, rows.extra_values, strict=True):
        frame_cols[name] = _extra_column(values[sel])
    return pd.DataFrame(frame_cols)
