"""Mutated sequences from a template and mutant strings, vectorised with numpy.

A mutant string lists substitutions separated by ':' — `A23G:L45P` — each the wild-type letter,
the 1-based position and the new letter (`*` = stop). The empty string is the wild type. The parser
and its checks are `runner.data.mutants` (torch-free: the importer uses the same one): all mutant
strings of a selection are one byte buffer parsed with array operations, with no Python loop per
variant. The result is the uint8 token matrix itself (template tokens broadcast per row, mutations
scattered in), so no per-variant string is ever built.

Example::

    vocab = get_vocab_processor("IUPAC")
    result = apply_mutants(["MKV"], np.zeros(2, np.int64), ["K2A", ""], vocab)
    vocab.decode(result.tokens)   # ["MAV", "MKV"]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from runner.core.vocab import BaseVocabProcessor
from runner.data.mutants import (  # noqa: F401  (MAX_DIGITS, MUT_SEP, ROW_SEP: re-exported for the core's readers)
    DUPLICATE,
    MALFORMED,
    MAX_DIGITS,
    MISMATCH,
    MUT_SEP,
    NONSTANDARD,
    OUT_OF_RANGE,
    REASONS,
    ROW_SEP,
    UNKNOWN_RESIDUE,
    MutantText,
    ParsedMutants,
    Problems,
    find_problems,
    parse_mutants,
    problem_text,
    template_matrix,
    upper,
)
from runner.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class MutationResult:
    """What `apply_mutants` produces for the rows it kept."""

    tokens: np.ndarray  # uint8 N_kept × L
    mut_num: np.ndarray  # int32 N_kept
    first_pos: np.ndarray  # int32 N_kept: smallest mutated 1-based position, 0 for the wild type
    keep: np.ndarray  # bool N_in: which input rows are in `tokens`
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows dropped (on_mismatch="drop")
    ascii: np.ndarray | None = None  # uint8 N_kept × L ASCII letters, NUL-padded (want_ascii=True)
    # int8 N_in: 0 for a kept row, else 1 + the index in REASONS of why it was dropped (on_mismatch="drop")
    reason: np.ndarray | None = None
    parsed: ParsedMutants | None = None  # the parse, for callers that word a dropped row's problem
    problems: Problems | None = None


def apply_mutants(
    templates: Sequence[str],
    source_codes: np.ndarray,
    mutants: MutantText | Sequence[str] | np.ndarray,
    vocab: BaseVocabProcessor,
    *,
    row_ids: np.ndarray | None = None,
    source_names: Sequence[str] | None = None,
    on_mismatch: str = "error",
    select: np.ndarray | None = None,
    want_ascii: bool = False,
    standard: bool = False,
) -> MutationResult:
    """Build the token matrix of mutated sequences.

    `templates[k]` is the wild type of source code k; `source_codes[i]` picks row i's template.
    Templates of different lengths are right-padded with `vocab.pad_id` to the longest. Each row is
    checked by `runner.data.mutants.find_problems`: syntax, one position twice, the position within
    the template, its wild-type letter, the new residue in the vocab, and with `standard` (what the
    importer and prediction require) the new residue one of the 20 standard amino acids or '*'.
    With `on_mismatch="error"` the first offending row raises DataError naming its id
    (`row_ids[i]`) and mutant, with `"drop"` such rows are left out and counted in `dropped` by
    reason. `select` (bool, one per row) limits the work to those rows (others are neither checked
    nor returned). `want_ascii` also returns the sequences as an ASCII matrix (NUL-padded).
    """
    if on_mismatch not in ("error", "drop"):
        raise ValueError(f"on_mismatch must be 'error' or 'drop', not {on_mismatch!r}")
    source_codes = np.asarray(source_codes, dtype=np.int64)
    n = source_codes.size
    text = mutants if isinstance(mutants, MutantText) else MutantText.from_strings(mutants)
    if len(text) != n:
        raise ValueError(f"{len(text)} mutants for {n} source codes")
    select = np.ones(n, dtype=bool) if select is None else np.asarray(select, dtype=bool)
    row_ids = np.arange(n, dtype=np.int64) if row_ids is None else np.asarray(row_ids)
    names = list(source_names) if source_names is not None else [str(k) for k in range(len(templates))]
    template_ascii, template_len = template_matrix(list(templates))  # S × Lmax, NUL-padded
    template_tokens = vocab.encode(template_ascii)

    parsed = parse_mutants(text)
    mt_tokens = vocab.lookup[parsed.mt]
    problems = find_problems(
        parsed,
        templates=template_ascii,
        template_len=template_len,
        codes=source_codes,
        residue_ok=vocab.lookup != 255,
        standard=standard,
        select=select,
    )
    bad_row = problems.bad
    if on_mismatch == "error" and bad_row.any():
        first_row = int(np.flatnonzero(bad_row)[0])  # report the earliest bad row, under its first reason
        raise _row_error(problems, first_row, parsed, row_ids, text, names, source_codes, templates, vocab)
    dropped = problems.counts()
    keep = select & ~bad_row
    if dropped:
        log.warning("dropped %d of %d variants that do not fit their template: %s", int(bad_row.sum()), n, dropped)

    kept_rows = np.flatnonzero(keep)
    new_index = np.cumsum(keep) - 1  # input row -> row in the kept matrix
    kept_codes = source_codes[kept_rows]
    subs = keep[parsed.row]
    sub_rows, sub_cols = new_index[parsed.row[subs]], parsed.position[subs] - 1
    # row gathers (a memcpy per row) and one scatter: cheap even for 1M × 300
    tokens = _rows_of(template_tokens, kept_codes)
    tokens[sub_rows, sub_cols] = mt_tokens[subs]
    ascii_out = None
    if want_ascii:
        ascii_out = _rows_of(template_ascii, kept_codes)
        ascii_out[sub_rows, sub_cols] = upper(parsed.mt[subs])

    # substitutions are grouped by row in row order, so a segmented min gives each row's first position
    first_pos = np.zeros(n, dtype=np.int32)
    has_subs = np.flatnonzero(parsed.mut_num > 0)
    if has_subs.size:
        seg_starts = (np.cumsum(parsed.mut_num) - parsed.mut_num)[has_subs]
        first_pos[has_subs] = np.minimum.reduceat(parsed.position, seg_starts)
    return MutationResult(
        tokens,
        parsed.mut_num[kept_rows],
        first_pos[kept_rows],
        keep,
        dropped,
        ascii_out,
        problems.reason,
        parsed,
        problems,
    )


def _rows_of(matrix: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """matrix[codes] as a new array; a broadcast copy when every row is the same template."""
    with _small_pages():
        if matrix.shape[0] == 1:
            out = np.empty((codes.size, matrix.shape[1]), dtype=matrix.dtype)
            out[:] = matrix[0]
            return out
        return matrix[codes]


@contextmanager
def _small_pages():
    """Allocate without numpy's transparent-huge-page hint.

    Why: where THP defrag is "madvise" (the common default), the kernel compacts memory on the
    first touch of a hinted allocation; for the token and ASCII matrices (300 MB each for 1 M
    variants of length 300, written once, then read row-wise) that stall made the cold end-to-end
    read 1.56 s median (1.34-1.72) against 1.36 s (1.30-1.41) without the hint, 6 runs each.
    """
    core = getattr(np, "_core", None) or np.core
    getter = getattr(core.multiarray, "_get_madvise_hugepage", None)
    setter = getattr(core.multiarray, "_set_madvise_hugepage", None)
    if getter is None or setter is None:
        yield
        return
    previous = setter(False)
    try:
        yield
    finally:
        setter(previous)


def _row_error(problems, row, parsed, row_ids, text, names, source_codes, templates, vocab) -> DataError:
    """The DataError for `row`, the first bad one (error path: plain Python is fine)."""
    reason = REASONS[int(problems.reason[row]) - 1]
    k = int(problems.sub[row])
    code = int(source_codes[row])
    template = templates[code]
    where = f"row id {int(row_ids[row])} (mutant {text[row]!r}, source {names[code]!r})"
    hint = "check the template and that positions are 1-based, or set data.on_mismatch to 'drop'"
    if reason == MALFORMED:
        what = "is not of the form <wild-type letter><1-based position><new letter>[:...], e.g. 'A23G:L45P'"
        return DataError(f"{where}: the mutant {what}; fix the data or set data.on_mismatch to 'drop'")
    pos = int(parsed.position[k])
    if reason == OUT_OF_RANGE:
        return DataError(f"{where}: position {pos} is outside the template (length {len(template)}); {hint}")
    if reason == MISMATCH:
        wt = chr(int(parsed.wt[k]))
        return DataError(
            f"{where}: wild type {wt!r} at position {pos} does not match the template's {template[pos - 1]!r}; {hint}"
        )
    if reason == UNKNOWN_RESIDUE:
        return DataError(
            f"{where}: new residue {chr(int(parsed.mt[k]))!r} is not in vocab {vocab.name!r} ({vocab.alphabet}); "
            "choose another vocab.name or set data.on_mismatch to 'drop'"
        )
    # duplicate, nonstandard: the importer's own words (it refuses these rows too)
    detail = problem_text(problems, row, parsed, text[row], template)
    return DataError(f"{where}: {detail}; fix the data or set data.on_mismatch to 'drop'")
