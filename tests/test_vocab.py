"""The vocab registry and the IUPAC processor: ids, padding, vectorised encode/decode, errors."""

from __future__ import annotations

import numpy as np
import pytest

from runner.core.registry import RegistryError
from runner.core.vocab import (
    IUPAC_AMINO_ACIDS,
    IUPAC_EXTENDED_CODES,
    PAD_ID,
    STOP_CODE,
    VOCABS,
    BaseVocabProcessor,
    get_vocab_processor,
    register_vocab,
)
from runner.errors import DataError

pytestmark = pytest.mark.core


def test_iupac_constants_and_ids():
    vocab = get_vocab_processor("IUPAC")
    assert IUPAC_AMINO_ACIDS == "ACDEFGHIKLMNPQRSTVWY"
    assert vocab.alphabet == IUPAC_AMINO_ACIDS + IUPAC_EXTENDED_CODES + STOP_CODE
    assert vocab.pad_id == PAD_ID == 0
    assert vocab.size == len(vocab.alphabet) + 1 == 28
    assert vocab.lookup.dtype == np.uint8 and vocab.lookup.shape == (256,)
    assert vocab.token_id("A") == 1 and vocab.token_id("*") == 27
    assert vocab.ids_of("ACY").tolist() == [1, 2, 20]


def test_encode_pads_and_decodes_round_trip():
    vocab = get_vocab_processor("IUPAC")
    tokens = vocab.encode(["MKV*", "MK", ""])
    assert tokens.dtype == np.uint8 and tokens.shape == (3, 4)
    assert tokens[1, 2:].tolist() == [0, 0] and tokens[2].tolist() == [0, 0, 0, 0]
    assert vocab.decode(tokens) == ["MKV*", "MK", ""]
    assert vocab.decode(tokens, keep_pad=True)[1] == "MK--"
    assert vocab.decode(tokens[0]) == "MKV*"
    assert vocab.encode(["mkv"]).tolist() == vocab.encode(["MKV"]).tolist()  # case-insensitive by default


def test_encode_accepts_ascii_matrix_and_fixed_length():
    vocab = get_vocab_processor("IUPAC")
    matrix = np.frombuffer(b"ACDE", dtype=np.uint8).reshape(2, 2)
    assert vocab.encode(matrix).tolist() == [[1, 2], [3, 4]]
    assert vocab.encode(["AC"], length=5).shape == (1, 5)
    with pytest.raises(DataError, match="longer than the fixed length 1"):
        vocab.encode(["AC"], length=1)


def test_unknown_letter_is_named():
    vocab = get_vocab_processor("IUPAC")
    with pytest.raises(DataError, match=r"letter '1' \(sequence 1, position 3\)"):
        vocab.encode(["MKV", "MK1"])
    with pytest.raises(DataError, match="non-ASCII"):
        vocab.encode(["MKé"])
    strict = get_vocab_processor("IUPAC", extended=False, stop=False)
    with pytest.raises(DataError, match="letter 'X'"):
        strict.encode(["MXV"])


def test_register_vocab_plugin_and_duplicate():
    @register_vocab("test_dna")
    def dna(**params):
        return BaseVocabProcessor("ACGT")

    try:
        vocab = get_vocab_processor("test_dna")
        assert vocab.name == "test_dna" and vocab.size == 5
        assert vocab.decode(vocab.encode(["ACGT", "GG"])) == ["ACGT", "GG"]
        with pytest.raises(RegistryError, match="registered twice"):
            register_vocab("test_dna", dna)
    finally:
        VOCABS.unregister("test_dna")
    with pytest.raises(RegistryError, match="unknown vocab 'nope'"):
        get_vocab_processor("nope")


def test_bad_alphabets_rejected():
    with pytest.raises(ValueError, match="repeats"):
        BaseVocabProcessor("AA")
    with pytest.raises(ValueError, match="non-empty"):
        BaseVocabProcessor("")
