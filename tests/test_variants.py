"""Vectorised mutant parsing and application: correctness against a per-row reference and every bad path."""

from __future__ import annotations

import numpy as np
import pytest

from runner.core.variants import MutantText, apply_mutants, parse_mutants
from runner.core.vocab import get_vocab_processor
from runner.errors import DataError

pytestmark = pytest.mark.core

VOCAB = get_vocab_processor("IUPAC")
TEMPLATE = "MSIQHFRVALIPFFAAFCLPVFAHPETLVKVKDAEDQLGARVGYIELDLNSGKILESFRP"


def reference(template: str, mutant: str) -> str:
    seq = list(template)
    for sub in filter(None, mutant.split(":")):
        assert seq[int(sub[1:-1]) - 1] == sub[0]
        seq[int(sub[1:-1]) - 1] = sub[-1]
    return "".join(seq)


def test_matches_per_row_reference_on_random_variants():
    rng = np.random.default_rng(1)
    mutants = []
    for _ in range(500):
        positions = rng.choice(len(TEMPLATE), size=rng.integers(0, 5), replace=False) + 1
        subs = [f"{TEMPLATE[p - 1]}{p}{'ACDEFGHIKLMNPQRSTVWY*'[rng.integers(21)]}" for p in positions]
        mutants.append(":".join(subs))
    result = apply_mutants([TEMPLATE], np.zeros(len(mutants), np.int64), mutants, VOCAB, want_ascii=True)
    expected = [reference(TEMPLATE, m) for m in mutants]
    assert VOCAB.decode(result.tokens) == expected
    assert [bytes(r).decode() for r in result.ascii] == expected
    assert result.mut_num.tolist() == [len(list(filter(None, m.split(":")))) for m in mutants]
    first = [min(int(s[1:-1]) for s in m.split(":")) if m else 0 for m in mutants]
    assert result.first_pos.tolist() == first
    assert result.keep.all() and result.dropped == {}


def test_wild_type_stop_and_several_templates_pad():
    result = apply_mutants(["MKV", "MKVLA"], np.array([0, 0, 1]), ["", "K2*", "A5G:M1C"], VOCAB)
    assert result.tokens.shape == (3, 5)
    assert VOCAB.decode(result.tokens) == ["MKV", "M*V", "CKVLG"]
    assert result.tokens[0, 3:].tolist() == [VOCAB.pad_id] * 2
    assert result.mut_num.tolist() == [0, 1, 2] and result.first_pos.tolist() == [0, 2, 1]


@pytest.mark.parametrize(
    ("mutant", "message"),
    [
        (
            "Q2A",
            r"row id 42 \(mutant 'Q2A', source 'src'\): wild type 'Q' at position 2 does not match the template's 'S'",
        ),
        ("M99A", r"row id 42 \(mutant 'M99A'.*position 99 is outside the template \(length 60\)"),
        ("M0A", r"position 0 is outside the template"),
        ("M1", r"mutant 'M1'.*not of the form"),
        ("1MA", r"mutant '1MA'.*not of the form"),
        ("M1A:", r"mutant 'M1A:'.*not of the form"),
        ("M1A::S2A", r"not of the form"),
        ("M1A S2A", r"not of the form"),
        ("MxA", r"not of the form"),
        ("*1A", r"not of the form"),
        ("M1234567890A", r"not of the form"),
    ],
)
def test_bad_mutants_name_row_id_and_mutant(mutant, message):
    with pytest.raises(DataError, match=message):
        apply_mutants(
            [TEMPLATE], np.zeros(2, np.int64), ["S2A", mutant], VOCAB, row_ids=np.array([41, 42]), source_names=["src"]
        )


def test_unknown_new_residue_for_a_strict_vocab():
    strict = get_vocab_processor("IUPAC", extended=False)
    with pytest.raises(DataError, match="new residue 'X' is not in vocab"):
        apply_mutants([TEMPLATE], np.zeros(1, np.int64), ["S2X"], strict)


def test_drop_mode_counts_each_reason_and_keeps_good_rows():
    mutants = ["S2A", "Q2A", "M99A", "garbage", "", "S2A:Q3A"]
    result = apply_mutants([TEMPLATE], np.zeros(6, np.int64), mutants, VOCAB, on_mismatch="drop")
    assert result.keep.tolist() == [True, False, False, False, True, False]
    assert result.dropped == {"malformed": 1, "out_of_range": 1, "mismatch": 2}
    assert VOCAB.decode(result.tokens) == [reference(TEMPLATE, "S2A"), TEMPLATE]


def test_select_skips_rows_without_checking_them():
    result = apply_mutants([TEMPLATE], np.zeros(2, np.int64), ["garbage", "S2A"], VOCAB, select=np.array([False, True]))
    assert result.keep.tolist() == [False, True] and result.tokens.shape[0] == 1


def test_mutant_text_from_joined_and_line_breaks():
    text = MutantText.from_joined("S2A\n\nM1C:S2A", 3)
    assert [text[i] for i in range(3)] == ["S2A", "", "M1C:S2A"]
    assert text.offsets().tolist() == [0, 3, 3, 10]
    parsed = parse_mutants(text)
    assert parsed.mut_num.tolist() == [1, 0, 2] and parsed.position.tolist() == [2, 1, 2]
    with pytest.raises(DataError, match="line break"):
        MutantText.from_strings(["S2A", "M1C\nS2A"])
    with pytest.raises(DataError, match="not a string"):
        MutantText.from_strings(["S2A", None])
    with pytest.raises(DataError, match="non-ASCII"):
        MutantText.from_strings(["S2A", "S2É"])


def test_empty_input():
    result = apply_mutants([TEMPLATE], np.zeros(0, np.int64), [], VOCAB)
    assert result.tokens.shape == (0, len(TEMPLATE))
