"""Mutant strings: the one parser that the importer, the training and `infra predict` share.

A mutant string lists substitutions separated by ':' (`A23G:L45P`), each the wild-type letter, the
1-based position and the new letter. The wild type is the empty string (or one of
`WILD_TYPE_SPELLINGS`). Every caller gives the same verdict, and the same message, for the same
mutant against the same template; the rules, checked in the order of `REASONS`:

- `malformed`: a substitution is not <letter><1 to 9 digits><letter or '*'> (the wild-type letter
  is never '*'; letters are ASCII, either case);
- `duplicate`: one position is mutated twice (`H24A:H24C`);
- `nonstandard`: the new residue is not one of the 20 standard amino acids or '*' (stop): the
  ambiguous or rare IUPAC codes B, Z, J, X, U, O are refused (a measured variant is one residue);
- `out_of_range`: a position outside the template;
- `mismatch`: the wild-type letter is not the template's residue at that position;
- `unknown_residue` (prediction and training only): the experiment's vocabulary lacks the new
  residue (e.g. '*' without the stop code).

A row's verdict is the first reason that applies to any of its substitutions, and its message
names the first such substitution. All mutant strings of a batch are one byte buffer (`MutantText`)
parsed with array operations: there is no Python loop per variant on the good path; only the text
of a rejected row is built in Python.

Torch-free and pandas-free (numpy only): the host's importer imports it, as do the training core
(`runner.core.variants`) and prediction (`runner.core.predict`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runner.errors import DataError, shorten

ROW_SEP = b"\n"
MUT_SEP = b":"
MAX_DIGITS = 9  # positions up to 999,999,999; more digits is a malformed mutant, not a long protein
STANDARD_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
STOP = "*"
# What a table may write for the wild type besides the empty string (ProteinGym and common DMS files).
WILD_TYPE_SPELLINGS = ("", "_wt", "wt", "WT", "wildtype", "wild_type")

MALFORMED = "malformed"
DUPLICATE = "duplicate"
NONSTANDARD = "nonstandard"
OUT_OF_RANGE = "out_of_range"
MISMATCH = "mismatch"
UNKNOWN_RESIDUE = "unknown_residue"
REASONS = (MALFORMED, DUPLICATE, NONSTANDARD, OUT_OF_RANGE, MISMATCH, UNKNOWN_RESIDUE)
# The reasons a template is needed for: the rest are checked on the text alone.
TEMPLATE_REASONS = (OUT_OF_RANGE, MISMATCH)


@dataclass
class ParsedMutants:
    """Flat arrays, one entry per single substitution, in row order (row, then order in the string)."""

    row: np.ndarray  # int64: index of the variant each substitution belongs to
    position: np.ndarray  # int64: 1-based position (0 where malformed)
    wt: np.ndarray  # uint8 ASCII of the wild-type letter
    mt: np.ndarray  # uint8 ASCII of the new letter
    malformed: np.ndarray  # bool: the substitution text is not <letter><digits><letter>
    mut_num: np.ndarray  # int32 per variant: number of substitutions (0 = wild type)


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

    @classmethod
    def of_one(cls, mutant: str) -> MutantText:
        """One mutant as the parser's buffer, whatever it holds: a non-ASCII character or a line
        break is kept as a byte the parser calls malformed, so the message names it (the importer)."""
        raw = mutant.encode("utf-8", "surrogateescape").replace(ROW_SEP, b"?")
        return cls(np.frombuffer(raw + ROW_SEP, dtype=np.uint8), 1)

    def __len__(self) -> int:
        return int(self.row_ends.size)

    def __getitem__(self, row: int) -> str:
        start = int(self.row_ends[row - 1]) + 1 if row > 0 else 0
        return self.buf[start : int(self.row_ends[row])].tobytes().decode("ascii")

    def row_starts(self) -> np.ndarray:
        starts = np.zeros(len(self), dtype=np.int64)
        starts[1:] = self.row_ends[:-1] + 1
        return starts

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
    the row. A row spelled as in `WILD_TYPE_SPELLINGS` is the wild type (no substitutions).
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
    whole_row = bound_is_row_end & prev_is_row_end
    wild = (lengths == 0) & whole_row
    wild |= whole_row & _spelled_wild_type(buf, starts, lengths)
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
    is_letter = _LETTERS
    malformed |= bad_digit | ~is_letter[wt] | ~(is_letter[mt] | (mt == ord(STOP)))
    position = np.where(malformed, 0, position)
    mut_num = np.bincount(piece_row, minlength=n).astype(np.int32)
    return ParsedMutants(piece_row.astype(np.int64), position, wt, mt, malformed, mut_num)


def _table(letters: str) -> np.ndarray:
    table = np.zeros(256, dtype=bool)
    for letter in letters:
        table[ord(letter.upper())] = table[ord(letter.lower())] = True
    return table


_LETTERS = _table("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_STANDARD = _table(STANDARD_AMINO_ACIDS + STOP)


def _spelled_wild_type(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """bool per piece: the piece's text is one of the non-empty `WILD_TYPE_SPELLINGS`."""
    out = np.zeros(starts.size, dtype=bool)
    for spelling in WILD_TYPE_SPELLINGS:
        if not spelling:
            continue
        word = np.frombuffer(spelling.encode("ascii"), dtype=np.uint8)
        candidates = np.flatnonzero(lengths == word.size)
        if candidates.size:
            letters = buf[starts[candidates, None] + np.arange(word.size)]
            out[candidates[(letters == word).all(axis=1)]] = True
    return out


def upper(ascii_codes: np.ndarray) -> np.ndarray:
    """ASCII codes with a-z raised to A-Z (same dtype)."""
    lower = (ascii_codes >= ord("a")) & (ascii_codes <= ord("z"))
    return np.where(lower, ascii_codes - 32, ascii_codes).astype(ascii_codes.dtype)


def template_matrix(templates: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(S × Lmax uint8 ASCII matrix NUL-padded, int64 lengths) of the templates."""
    raw = [t.encode("ascii") for t in templates]
    width = max((len(r) for r in raw), default=0)
    matrix = np.zeros((len(raw), width), dtype=np.uint8)
    for i, r in enumerate(raw):
        matrix[i, : len(r)] = np.frombuffer(r, dtype=np.uint8)
    return matrix, np.array([len(r) for r in raw], dtype=np.int64)


@dataclass
class Problems:
    """Per variant: why it is rejected (0 = it is not) and which substitution shows it."""

    reason: np.ndarray  # int8: 0 fine, else 1 + the index in REASONS
    sub: np.ndarray  # int64: index in the parsed arrays of the first offending substitution, -1 when fine
    flags: dict[str, np.ndarray]  # reason -> bool per substitution (for callers that count them)

    @property
    def bad(self) -> np.ndarray:
        return self.reason != 0

    def counts(self) -> dict[str, int]:
        """Rows per reason (each row under its first reason), only the reasons that occur."""
        tally = np.bincount(self.reason, minlength=len(REASONS) + 1)
        return {r: int(c) for r, c in zip(REASONS, tally[1:], strict=True) if c}


def find_problems(
    parsed: ParsedMutants,
    *,
    templates: np.ndarray | None = None,
    template_len: np.ndarray | None = None,
    codes: np.ndarray | None = None,
    residue_ok: np.ndarray | None = None,
    standard: bool = True,
    select: np.ndarray | None = None,
) -> Problems:
    """Check parsed mutants (vectorised): the syntax and duplicate positions always, the new
    residues against the 20 standard amino acids and '*' when `standard`, positions and wild-type
    letters against `templates` (S × L ASCII, `template_len` per template, `codes` per variant: its
    template) when given, and the new residues against `residue_ok` (bool per ASCII byte: the
    vocabulary encodes it) when given. `select` (bool per variant) limits the checks to those rows."""
    n = parsed.mut_num.size
    active = np.ones(parsed.row.size, dtype=bool) if select is None else np.asarray(select, dtype=bool)[parsed.row]
    malformed = active & parsed.malformed
    fine = active & ~malformed
    flags = {MALFORMED: malformed, DUPLICATE: fine & _repeated_positions(parsed, fine)}
    if standard:
        flags[NONSTANDARD] = fine & ~_STANDARD[parsed.mt]
    if templates is not None:
        sub_codes = np.zeros(parsed.row.size, np.int64) if codes is None else np.asarray(codes, np.int64)[parsed.row]
        out_of_range = fine & ((parsed.position < 1) | (parsed.position > template_len[sub_codes]))
        checkable = fine & ~out_of_range
        actual = templates[sub_codes, np.where(checkable, parsed.position - 1, 0)]
        flags[OUT_OF_RANGE] = out_of_range
        flags[MISMATCH] = checkable & (upper(actual) != upper(parsed.wt))
    if residue_ok is not None:
        flags[UNKNOWN_RESIDUE] = fine & ~residue_ok[parsed.mt]
    reason = np.zeros(n, dtype=np.int8)
    sub = np.full(n, -1, dtype=np.int64)
    for code, name in enumerate(REASONS, start=1):
        flagged = flags.get(name)
        if flagged is None or not flagged.any():
            continue
        where = np.flatnonzero(flagged)
        rows, first = np.unique(parsed.row[where], return_index=True)  # each row's first such substitution
        new = reason[rows] == 0
        reason[rows[new]] = code
        sub[rows[new]] = where[first[new]]
    return Problems(reason, sub, flags)


def _repeated_positions(parsed: ParsedMutants, fine: np.ndarray) -> np.ndarray:
    """bool per substitution: an earlier substitution of its variant has the same position."""
    out = np.zeros(parsed.row.size, dtype=bool)
    multi = np.flatnonzero(fine & (parsed.mut_num[parsed.row] > 1))  # only multi-mutants can repeat one
    if multi.size < 2:
        return out
    order = multi[np.lexsort((multi, parsed.position[multi], parsed.row[multi]))]
    same = (parsed.row[order[1:]] == parsed.row[order[:-1]]) & (
        parsed.position[order[1:]] == parsed.position[order[:-1]]
    )
    out[order[1:][same]] = True
    return out


def problem_text(
    problems: Problems,
    row: int,
    parsed: ParsedMutants,
    mutant: str,
    template: str | None = None,
    vocab: str | None = None,
) -> str:
    """The message of a rejected variant: what is wrong with which substitution (without the mutant
    itself or the file: callers add where it is). `mutant` is the row's text as parsed, `template`
    its template, `vocab` a description of the vocabulary ("'IUPAC' (ACDE…)")."""
    reason = REASONS[int(problems.reason[row]) - 1]
    k = int(problems.sub[row])
    part = mutant.split(":")[k - _first_sub_of(parsed, row)]
    if reason == MALFORMED:
        return (
            f"malformed at {shorten(part, 30)}; expected <wild type><1-based position><new residue>, "
            "e.g. 'A23G' or 'A23G:L45P'"
        )
    pos = int(parsed.position[k])
    if reason == DUPLICATE:
        earlier = mutant.split(":")[_first_at(parsed, row, pos) - _first_sub_of(parsed, row)]
        return f"mutates position {pos} twice ({earlier} and {part})"
    new = chr(int(parsed.mt[k])).upper()
    if reason == NONSTANDARD:
        return (
            f"new residue {new!r} at position {pos} is not one of the 20 standard amino acids "
            f"({STANDARD_AMINO_ACIDS}) or '*' (stop)"
        )
    if reason == OUT_OF_RANGE:
        return f"position {pos} is outside the template (length {len(template or '')})"
    if reason == MISMATCH:
        wt = chr(int(parsed.wt[k])).upper()
        return f"wild type {wt!r} at position {pos} does not match the template's {template[pos - 1]!r}"
    return f"new residue {new!r} at position {pos} is not in the experiment's vocabulary {vocab}"


def _first_sub_of(parsed: ParsedMutants, row: int) -> int:
    return int(np.searchsorted(parsed.row, row, side="left"))


def _first_at(parsed: ParsedMutants, row: int, pos: int) -> int:
    """The index of the first substitution of `row` at position `pos`."""
    start = _first_sub_of(parsed, row)
    stop = start + int(parsed.mut_num[row])
    return start + int(np.flatnonzero(parsed.position[start:stop] == pos)[0])


def check_mutant(mutant: str, template: str | None = None) -> tuple[list[tuple[str, int, str]], str | None]:
    """One mutant through the same parser and checks (the importer's careful path): its
    substitutions (letters upper-cased) and None, or ([], the message) when it is rejected. Without
    `template`, only the checks that need none (syntax, duplicates, residues)."""
    parsed = parse_mutants(MutantText.of_one(mutant))
    if template is None:
        problems = find_problems(parsed)
    else:
        matrix, length = template_matrix([template])
        problems = find_problems(parsed, templates=matrix, template_len=length)
    if problems.reason[0]:
        return [], problem_text(problems, 0, parsed, mutant, template)
    subs = [
        (chr(w).upper(), int(p), chr(m).upper())
        for w, p, m in zip(parsed.wt.tolist(), parsed.position.tolist(), parsed.mt.tolist(), strict=True)
    ]
    return subs, None
