"""Mutated sequences from a template and mutant strings, vectorised with numpy.

A mutant string lists substitutions separated by ':' — `A23G:L45P` — each the wild-type letter,
the 1-based position and the new letter (`*` = stop). The empty string is the wild type. All
mutant strings of a selection are joined into one byte buffer and parsed with array operations:
there is no Python loop per variant. The result is the uint8 token matrix itself (template tokens
broadcast per row, mutations scattered in), so no per-variant string is ever built.

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

from runner.core.vocab import BaseVocabProcessor, ascii_matrix
from runner.errors import DataError

log = logging.getLogger(__name__)

ROW_SEP = b"\n"
MUT_SEP = b":"
MAX_DIGITS = 9  # positions up to 999,999,999; more digits is a malformed mutant, not a long protein

# Reasons a row can be rejected, in the order they are checked; also the keys of `dropped`.
MALFORMED = "malformed"
OUT_OF_RANGE = "out_of_range"
MISMATCH = "mismatch"
UNKNOWN_RESIDUE = "unknown_residue"
REASONS = (MALFORMED, OUT_OF_RANGE, MISMATCH, UNKNOWN_RESIDUE)


@dataclass
class ParsedMutants:
    """Flat arrays, one entry per single substitution, in row order (row, then order in the string)."""

    row: np.ndarray  # int64: index of the variant each substitution belongs to
    position: np.ndarray  # int64: 1-based position (0 where malformed)
    wt: np.ndarray  # uint8 ASCII of the wild-type letter
    mt: np.ndarray  # uint8 ASCII of the new letter
    malformed: np.ndarray  # bool: the substitution text is not <letter><digits><letter>
    mut_num: np.ndarray  # int32 per variant: number of substitutions (0 = wild type)


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


class MutantText:
    """n mutant strings held as one ASCII buffer, every row followed by a newline.

    This is the form the parser works on; `from_joined` takes the text SQLite's group_concat
    produces, so a selection's mutants never become n Python strings.
    """

    def __init__(self, buf: np.ndarray, n: int):
        self.buf = buf
        is_row_end = buf == ROW_SEP[0]
        self.row_ends = np.flatnonzero(is_row_end)
        if self.row_ends.size != n:
            raise DataError(f"{self.row_ends.size - n} mutant string(s) contain a line break; mutants are 'A23G:L45P'")
        self.is_row_end = is_row_end

    @classmethod
    def from_strings(cls, mutants: Sequence[str] | np.ndarray) -> MutantText:
        items = mutants.tolist() if isinstance(mutants, np.ndarray) else list(mutants)
        try:
            text = "\n".join(items)
        except TypeError:
            bad = next(i for i, m in enumerate(items) if not isinstance(m, str))
            raise DataError(f"row {bad}: mutant {items[bad]!r} is not a string; use '' for the wild type") from None
        bad = (
            next((i for i, m in enumerate(items) if "\n" in m), None)
            if text.count("\n") != max(len(items) - 1, 0)
            else None
        )
        if bad is not None:
            raise DataError(f"row {bad}: mutant {items[bad]!r} contains a line break")
        return cls.from_joined(text, len(items))

    @classmethod
    def from_joined(cls, text: str | bytes, n: int) -> MutantText:
        """`text` = the n mutants joined with newlines (no trailing one), e.g. from group_concat."""
        if n == 0:
            return cls(np.zeros(0, dtype=np.uint8), 0)
        if isinstance(text, str):
            try:
                raw = text.encode("ascii")
            except UnicodeEncodeError as exc:
                row = text.count("\n", 0, exc.start)
                raise DataError(f"row {row}: mutant {text.split(chr(10))[row]!r} has a non-ASCII character") from None
        else:
            raw = bytes(text)
        return cls(np.frombuffer(raw + ROW_SEP, dtype=np.uint8), n)

    def __len__(self) -> int:
        return int(self.row_ends.size)

    def __getitem__(self, row: int) -> str:
        start = int(self.row_ends[row - 1]) + 1 if row > 0 else 0
        return self.buf[start : int(self.row_ends[row])].tobytes().decode("ascii")

    def offsets(self) -> np.ndarray:
        """Arrow-style int64 offsets (n + 1) of the rows in `letters()`."""
        out = np.zeros(len(self) + 1, dtype=np.int64)
        out[1:] = self.row_ends - np.arange(len(self))
        return out

    def letters(self) -> np.ndarray:
        """The buffer without the newlines: row i is letters()[offsets[i]:offsets[i+1]]."""
        return self.buf[~self.is_row_end]


def parse_mutants(mutants: MutantText | Sequence[str] | np.ndarray) -> ParsedMutants:
    """Split mutant strings into flat substitution arrays without a per-variant Python loop.

    Malformed substitutions are flagged, not raised: the caller decides (error or drop) and names
    the row.
    """
    text = mutants if isinstance(mutants, MutantText) else MutantText.from_strings(mutants)
    buf, n, is_row_end = text.buf, len(text), text.is_row_end
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return ParsedMutants(
            empty, empty, empty.astype(np.uint8), empty.astype(np.uint8), empty.astype(bool), empty.astype(np.int32)
        )
    bounds = np.flatnonzero(is_row_end | (buf == MUT_SEP[0]))
    starts = np.empty_like(bounds)
    starts[0:1] = 0
    starts[1:] = bounds[:-1] + 1
    ends = bounds  # exclusive
    bound_is_row_end = is_row_end[bounds]
    # row index of each piece = number of row ends strictly before it
    piece_row = np.cumsum(bound_is_row_end) - bound_is_row_end
    lengths = ends - starts
    # A row is the wild type when its only piece is empty: the piece ends the row and starts one.
    prev_is_row_end = np.empty_like(bound_is_row_end)
    prev_is_row_end[0:1] = True
    prev_is_row_end[1:] = bound_is_row_end[:-1]
    wild = (lengths == 0) & bound_is_row_end & prev_is_row_end
    pieces = ~wild
    starts, ends, lengths, piece_row = starts[pieces], ends[pieces], lengths[pieces], piece_row[pieces]

    malformed = (lengths < 3) | (lengths > MAX_DIGITS + 2)
    safe_start = np.where(malformed, 0, starts)
    safe_end = np.where(malformed, 1, ends)
    wt = np.where(malformed, 0, buf[safe_start]).astype(np.uint8)
    mt = np.where(malformed, 0, buf[safe_end - 1]).astype(np.uint8)
    # positions: one pass per digit place (at most MAX_DIGITS passes, not one per variant)
    n_digits = np.where(malformed, 1, lengths - 2)
    width = int(n_digits.max()) if n_digits.size else 0
    letter_at = safe_end - 1  # index of the new letter; digits sit right before it
    position = np.zeros(starts.size, dtype=np.int64)
    bad_digit = np.zeros(starts.size, dtype=bool)
    scale = 1
    for k in range(1, width + 1):
        present = n_digits >= k
        digit = buf[np.maximum(letter_at - k, 0)] - np.uint8(ord("0"))  # uint8: below '0' wraps above 9
        bad_digit |= present & (digit > 9)
        position += np.where(present, digit, 0).astype(np.int64) * scale
        scale *= 10
    is_letter = _letter_table()
    malformed |= bad_digit | ~is_letter[wt] | (wt == ord("*")) | ~(is_letter[mt] | (mt == ord("*")))
    position = np.where(malformed, 0, position)
    mut_num = np.bincount(piece_row, minlength=n).astype(np.int32)
    return ParsedMutants(piece_row.astype(np.int64), position, wt, mt, malformed, mut_num)


def _letter_table() -> np.ndarray:
    table = np.zeros(256, dtype=bool)
    table[ord("A") : ord("Z") + 1] = True
    table[ord("a") : ord("z") + 1] = True
    return table


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
) -> MutationResult:
    """Build the token matrix of mutated sequences.

    `templates[k]` is the wild type of source code k; `source_codes[i]` picks row i's template.
    Templates of different lengths are right-padded with `vocab.pad_id` to the longest. Each
    substitution's wild-type letter must match the template and its position lie within it; with
    `on_mismatch="error"` the first offending row raises DataError naming its id (`row_ids[i]`)
    and mutant, with `"drop"` such rows are left out and counted in `dropped` by reason.
    `select` (bool, one per row) limits the work to those rows (others are neither checked nor
    returned). `want_ascii` also returns the sequences as an ASCII matrix (NUL-padded).
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
    template_ascii = ascii_matrix(list(templates))  # S × Lmax, NUL-padded
    template_tokens = vocab.encode(template_ascii)
    template_len = (template_ascii != 0).sum(axis=1).astype(np.int64)

    parsed = parse_mutants(text)
    codes = source_codes[parsed.row]
    active = select[parsed.row]
    malformed = active & parsed.malformed
    out_of_range = active & ~malformed & ((parsed.position < 1) | (parsed.position > template_len[codes]))
    checkable = active & ~malformed & ~out_of_range
    col = np.where(checkable, parsed.position - 1, 0)
    actual = template_ascii[codes, col]
    mismatch = checkable & (_upper(actual) != _upper(parsed.wt))
    mt_tokens = vocab.lookup[parsed.mt]
    unknown = checkable & ~mismatch & (mt_tokens == 255)

    reasons = ((MALFORMED, malformed), (OUT_OF_RANGE, out_of_range), (MISMATCH, mismatch), (UNKNOWN_RESIDUE, unknown))
    if on_mismatch == "error":
        any_bad = malformed | out_of_range | mismatch | unknown
        if any_bad.any():
            first_row = int(parsed.row[any_bad].min())  # report the earliest bad row, under its first reason
            reason, flags = next((r, f) for r, f in reasons if (f & (parsed.row == first_row)).any())
            raise _row_error(
                reason,
                first_row,
                parsed,
                flags,
                row_ids,
                text,
                names,
                source_codes,
                template_ascii,
                template_len,
                vocab,
            )
    bad_row = np.zeros(n, dtype=bool)
    row_reason = np.zeros(n, dtype=np.int8)
    dropped: dict[str, int] = {}
    for code, (reason, flags) in enumerate(reasons, start=1):
        if not flags.any():
            continue
        rows = np.unique(parsed.row[flags])
        rows = rows[~bad_row[rows]]  # count each row once, under its first reason
        bad_row[rows] = True
        row_reason[rows] = code
        if rows.size:
            dropped[reason] = int(rows.size)
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
        ascii_out[sub_rows, sub_cols] = _upper(parsed.mt[subs])

    # substitutions are grouped by row in row order, so a segmented min gives each row's first position
    first_pos = np.zeros(n, dtype=np.int32)
    has_subs = np.flatnonzero(parsed.mut_num > 0)
    if has_subs.size:
        seg_starts = (np.cumsum(parsed.mut_num) - parsed.mut_num)[has_subs]
        first_pos[has_subs] = np.minimum.reduceat(parsed.position, seg_starts)
    return MutationResult(tokens, parsed.mut_num[kept_rows], first_pos[kept_rows], keep, dropped, ascii_out, row_reason)


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


def _upper(ascii_codes: np.ndarray) -> np.ndarray:
    lower = (ascii_codes >= ord("a")) & (ascii_codes <= ord("z"))
    return np.where(lower, ascii_codes - 32, ascii_codes)


def _row_error(reason, row, parsed, flags, row_ids, text, names, source_codes, template_ascii, template_len, vocab):
    """The DataError for the first bad substitution of `row` (error path: plain Python is fine)."""
    k = int(np.flatnonzero(flags & (parsed.row == row))[0])
    code = int(source_codes[row])
    where = f"row id {int(row_ids[row])} (mutant {text[row]!r}, source {names[code]!r})"
    if reason == MALFORMED:
        what = "is not of the form <wild-type letter><1-based position><new letter>[:...], e.g. 'A23G:L45P'"
        return DataError(f"{where}: the mutant {what}; fix the data or set data.on_mismatch to 'drop'")
    pos = int(parsed.position[k])
    if reason == OUT_OF_RANGE:
        return DataError(
            f"{where}: position {pos} is outside the template (length {int(template_len[code])}); "
            "check the template and that positions are 1-based, or set data.on_mismatch to 'drop'"
        )
    wt = chr(int(parsed.wt[k]))
    if reason == MISMATCH:
        actual = chr(int(template_ascii[code, pos - 1]))
        return DataError(
            f"{where}: wild type {wt!r} at position {pos} does not match the template's {actual!r}; "
            "check the template and that positions are 1-based, or set data.on_mismatch to 'drop'"
        )
    return DataError(
        f"{where}: new residue {chr(int(parsed.mt[k]))!r} is not in vocab {vocab.name!r} ({vocab.alphabet}); "
        "choose another vocab.name or set data.on_mismatch to 'drop'"
    )
