"""Checking imported rows: mutants against the template (wild-type letters, positions), scores and
bins as finite numbers, templates taken from `mutated_sequence`; one readable line per bad row."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from runner.data.tables import Table
from runner.errors import DataError, shorten

# --- checking rows ----------------------------------------------------------------------------------


SUBSTITUTION = re.compile(r"([A-Za-z])([0-9]{1,9})([A-Za-z*])")  # the fast path's pre-check, see _fast_substitutions
TEMPLATE = re.compile(r"[A-Za-z*]+")
MISSING_VALUES = {"", "nan", "NaN", "NAN", "NA", "N/A", "na", "null", "NULL", "None"}
SEQUENCE_COLUMN = "mutated_sequence"


def _mutants():
    """`runner.data.mutants` (the parser prediction shares), imported on first use: it needs numpy,
    which `infra data` must not load at start-up (tests/test_data_import.py checks)."""
    from runner.data import mutants

    return mutants


def parse_substitutions(mutant: str, where: str) -> list[tuple[str, int, str]]:
    """`A23G:L45P` -> [('A', 23, 'G'), ('L', 45, 'P')]; [] for the wild type. DataError when the
    text alone is wrong (syntax, a position twice, a non-standard residue): the rules and messages
    of `runner.data.mutants`, which prediction applies too."""
    subs, problem = _mutants().check_mutant(mutant)
    if problem is not None:
        raise DataError(f"{where}: mutant {shorten(mutant)}: {problem}")
    return subs


def check_substitutions(subs: list[tuple[str, int, str]], mutant: str, template: str, where: str, hint: str) -> None:
    """DataError unless every substitution lies in `template` and names its wild-type letter."""
    _, problem = _mutants().check_mutant(mutant, template)
    if problem is not None:
        raise DataError(f"{where}: mutant {shorten(mutant)}: {problem}; {hint}")


def parse_mutant(mutant: str, template: str, where: str) -> int:
    """Check one mutant string against the template and return its number of substitutions."""
    subs = parse_substitutions(mutant, where)
    check_substitutions(subs, mutant, template, where, "check --template and that positions are 1-based")
    return len(subs)


def _apply(template: str, subs: list[tuple[str, int, str]]) -> str:
    pieces, last = [], 0
    for _, pos, new in sorted(subs, key=lambda s: s[1]):
        pieces += [template[last : pos - 1], new]
        last = pos
    pieces.append(template[last:])
    return "".join(pieces)


def _template_from_sequence(sequence: str, subs: list[tuple[str, int, str]], mutant: str, where: str) -> str:
    """The wild type of a ProteinGym row: its mutated_sequence with the substitutions reverted."""
    seq = sequence.strip().upper()
    if not TEMPLATE.fullmatch(seq):
        raise DataError(f"{where}: {SEQUENCE_COLUMN} {shorten(sequence)} is not a protein sequence (letters, '*')")
    letters = list(seq)
    for wt, pos, new in subs:
        if not 1 <= pos <= len(letters) or letters[pos - 1] != new:
            raise DataError(
                f"{where}: mutant {shorten(mutant)} does not fit its {SEQUENCE_COLUMN} (position {pos} should be "
                f"{new!r}); pass --template"
            )
        letters[pos - 1] = wt
    return "".join(letters)


def _parse_float(value: Any, where: str, column: str) -> float | None:
    """A score: None when missing (empty, NaN, NA…); ±inf is returned as is (the caller counts it)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return None if math.isnan(value) else float(value)
    text = str(value).strip()
    if text in MISSING_VALUES:
        return None
    try:
        number = float(text)
    except ValueError:
        raise DataError(
            f"{where}: column {column!r} value {shorten(text, 40)} is not a number (empty or NaN mean missing)"
        ) from None
    return None if math.isnan(number) else number


def _parse_bin(value: Any, where: str, column: str) -> int | None:
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    number = _parse_float(value, where, column)
    if number is None:
        return None
    if number not in (0.0, 1.0):
        raise DataError(f"{where}: column {column!r} value {shorten(value, 40)} must be 0 or 1")
    return int(number)


def _extra_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return None if value is None or value == "" else value


@dataclass
class _Counts:
    rows: int = 0
    wild_type_rows: int = 0
    nan_scores: int = 0
    non_finite_scores: int = 0
    max_mut_num: int = 0


@dataclass
class _Spec:
    """What to take from a table: columns, the template (or where it comes from) and the bins."""

    source: str
    template: str | None
    score_column: str = "DMS_score"
    bin_column: str | None = "DMS_score_bin"
    binarize_cutoff: float | None = None
    extra_columns: list[str] = field(default_factory=list)
    description: str = ""
    template_from: str = "--template"


def _row_reader(table: Table, spec: _Spec, counts: _Counts) -> Iterator[tuple]:
    """Check the header now, then lazily every row: yields (mutant, DMS_score, DMS_score_bin, mut_num, extras…).

    Sets `spec.template` from the first row's mutated_sequence when it is None.
    """
    header = table.header
    required = ["mutant", spec.score_column, *spec.extra_columns]
    if spec.bin_column and spec.binarize_cutoff is None and spec.bin_column != "DMS_score_bin":
        required.append(spec.bin_column)
    if spec.template is None:
        required.append(SEQUENCE_COLUMN)
    missing = [c for c in required if c not in header]
    if missing:
        hint = "; or pass --template" if missing == [SEQUENCE_COLUMN] else ""
        raise DataError(
            f"{table.name}: missing column(s) {', '.join(map(repr, missing))}; the header has: "
            f"{shorten(', '.join(header), 300, quote=False)}{hint}"
        )
    index = {h: i for i, h in enumerate(header)}
    i_mutant, i_score = index["mutant"], index[spec.score_column]
    use_bin = spec.binarize_cutoff is None and bool(spec.bin_column) and spec.bin_column in index
    i_bin = index[spec.bin_column] if use_bin else None
    i_seq = index.get(SEQUENCE_COLUMN)
    i_extras = [index[c] for c in spec.extra_columns]
    hint = (
        "check --template and that positions are 1-based"
        if spec.template_from == "--template"
        else f"the template comes from {spec.template_from}"
    )
    return _rows(table, spec, counts, hint, i_mutant, i_score, i_bin, i_seq, i_extras)


KNOWN_MAX = 1 << 18  # cache of checked substitutions (a template has at most ~21 per position)


def _fast_substitutions(
    mutant: Any, template: str, known: dict[str, tuple[str, int, str]], wild: frozenset, standard: frozenset
) -> list | None:
    """The substitutions of an ordinary mutant, each checked against the template, or None when the
    row needs the careful path (wild type, anything malformed, mismatched or refused: the shared
    parser names the problem). It accepts only what `runner.data.mutants` accepts.

    Checked substitutions are cached by their text, so a row costs a few dict lookups; the cache is
    bounded by the template's possible substitutions, not by the file.
    """
    if not isinstance(mutant, str) or not mutant or mutant in wild:
        return None
    subs = []
    for part in mutant.split(":"):
        hit = known.get(part)
        if hit is None:
            match = SUBSTITUTION.fullmatch(part)
            if match is None:
                return None
            wt, pos_text, new = match.groups()
            pos = int(pos_text)
            if not 1 <= pos <= len(template) or template[pos - 1] != wt.upper() or new.upper() not in standard:
                return None
            hit = (wt.upper(), pos, new.upper())
            if len(known) < KNOWN_MAX:
                known[part] = hit
        subs.append(hit)
    if len(subs) > 1 and len({pos for _, pos, _ in subs}) != len(subs):
        return None
    return subs


def _rows(table, spec, counts, hint, i_mutant, i_score, i_bin, i_seq, i_extras) -> Iterator[tuple]:
    """The row loop: a fast path for ordinary rows; anything else goes through the checks that name
    the file, line and problem (the messages are only built when a row needs them)."""
    width = len(table.header)
    template = spec.template
    known: dict[str, tuple[str, int, str]] = {}
    rules = _mutants()
    wild, standard = frozenset(rules.WILD_TYPE_SPELLINGS), frozenset(rules.STANDARD_AMINO_ACIDS + rules.STOP)
    for loc, values in table.rows:
        if len(values) != width:
            more = "more" if len(values) > width else "fewer"
            raise DataError(f"{table.where(loc)}: the row has {more} fields ({len(values)}) than the header ({width})")
        mutant = values[i_mutant]
        if isinstance(mutant, str):
            mutant = mutant.strip()
        subs = _fast_substitutions(mutant, template, known, wild, standard) if template is not None else None
        if subs is None:
            where = table.where(loc)
            mutant = "" if mutant is None else str(mutant).strip()
            subs = parse_substitutions(mutant, where)
            if template is None:
                template = _template_from_sequence(str(values[i_seq] or ""), subs, mutant, where)
                spec.template, hint = template, f"the template was taken from the {SEQUENCE_COLUMN} of {where}"
            check_substitutions(subs, mutant, template, where, hint)
        if i_seq is not None:
            sequence, expected = values[i_seq], _apply(template, subs)
            if sequence is not None and sequence != expected and str(sequence).strip().upper() != expected:
                raise DataError(
                    f"{table.where(loc)}: {SEQUENCE_COLUMN} is not the template with mutant {shorten(mutant)} "
                    f"applied; {hint}"
                )
        mut_num = len(subs)
        if mut_num == 0:
            mutant = ""
            counts.wild_type_rows += 1
        elif mut_num > counts.max_mut_num:
            counts.max_mut_num = mut_num
        raw = values[i_score]
        try:
            score = float(raw)
        except (TypeError, ValueError):
            score = _parse_float(raw, table.where(loc), spec.score_column)
        if score is None or score != score:  # missing, or NaN
            score = None
            counts.nan_scores += 1
        elif score in (math.inf, -math.inf):
            counts.non_finite_scores += 1
            score = None
        if spec.binarize_cutoff is not None:
            score_bin = None if score is None else int(score >= spec.binarize_cutoff)
        elif i_bin is not None:
            raw = values[i_bin]
            score_bin = 1 if raw == "1" else 0 if raw == "0" else _parse_bin(raw, table.where(loc), spec.bin_column)
        else:
            score_bin = None
        counts.rows += 1
        if i_extras:
            yield (mutant, score, score_bin, mut_num, *[_extra_value(values[i]) for i in i_extras])
        else:
            yield (mutant, score, score_bin, mut_num)
