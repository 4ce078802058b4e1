"""Vocabularies: how residue letters become the uint8 token ids the whole data path works in.

A vocab processor maps each letter of its alphabet to an id 1..len(alphabet); id 0 is padding, so
sequences of different lengths share one N × L matrix. Encoding is one table lookup over a
uint8 matrix of ASCII codes (no Python loop per sequence). Plugins add vocabularies with
`register_vocab(name, factory)`; the plan picks one with `vocab.name` / `vocab.params`.

Example::

    vocab = get_vocab_processor("IUPAC")
    tokens = vocab.encode(["MKV", "MK"])     # uint8 [[m, k, v], [m, k, 0]]
    vocab.decode(tokens)                     # ["MKV", "MK"]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from runner.core.registry import Registry
from runner.errors import DataError

log = logging.getLogger(__name__)

IUPAC_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
"""The 20 standard amino acids, one-letter IUPAC codes, alphabetical."""
IUPAC_EXTENDED_CODES = "BZXJUO"
"""Ambiguity and rare codes: B (D/N), Z (E/Q), X (any), J (I/L), U (selenocysteine), O (pyrrolysine)."""
STOP_CODE = "*"
"""Stop codon, allowed as the new residue of a mutation (nonsense variants)."""
IUPAC_ALPHABET = IUPAC_AMINO_ACIDS + IUPAC_EXTENDED_CODES + STOP_CODE
PAD_ID = 0
PAD_TOKEN = "-"  # how padding prints in decode(..., keep_pad=True); never a valid input letter

_UNKNOWN = 255  # lookup-table marker for bytes outside the alphabet (ids are < 255 by construction)

VOCABS: Registry[BaseVocabProcessor] = Registry("vocab")


class BaseVocabProcessor:
    """Letter ⇄ id mapping over a fixed alphabet, with id 0 reserved for padding.

    Subclasses (or plugin factories) only need to pass an alphabet; `encode`/`decode` are shared and
    vectorised. `size` counts the padding id, so an embedding table needs `size` rows.
    """

    name = "base"

    def __init__(self, alphabet: str, *, case_sensitive: bool = False):
        if not alphabet:
            raise ValueError("a vocabulary needs a non-empty alphabet")
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"vocabulary alphabet {alphabet!r} repeats a letter")
        if len(alphabet) >= _UNKNOWN - 1:
            raise ValueError(
                f"vocabulary alphabet has {len(alphabet)} letters; at most {_UNKNOWN - 2} fit in uint8 ids"
            )
        try:
            raw = alphabet.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"vocabulary alphabet {alphabet!r} must be ASCII") from None
        if 0 in raw:
            raise ValueError("vocabulary alphabet must not contain NUL (it is the padding byte)")
        self.alphabet = alphabet
        self.pad_id = PAD_ID
        self.size = len(alphabet) + 1
        table = np.full(256, _UNKNOWN, dtype=np.uint8)
        table[0] = PAD_ID  # NUL bytes are what numpy's fixed-width 'S' arrays pad with
        ids = np.arange(1, self.size, dtype=np.uint8)
        table[np.frombuffer(raw, dtype=np.uint8)] = ids
        if not case_sensitive:
            table[np.frombuffer(alphabet.lower().encode("ascii"), dtype=np.uint8)] = ids
            table[np.frombuffer(alphabet.upper().encode("ascii"), dtype=np.uint8)] = ids
        self.lookup = table
        inverse = np.zeros(256, dtype=np.uint8)
        inverse[ids] = np.frombuffer(raw, dtype=np.uint8)
        self.inverse = inverse  # id -> ASCII byte; pad -> NUL, which 'S' arrays strip on decode

    # -- ids -------------------------------------------------------------------------------------
    def token_id(self, letter: str) -> int:
        """The id of one letter; DataError when the letter is not in the alphabet."""
        code = ord(letter) if len(letter) == 1 and ord(letter) < 256 else 256
        if code == 256 or self.lookup[code] == _UNKNOWN or code == 0:
            raise DataError(f"vocab {self.name!r}: letter {letter!r} is not in the alphabet {self.alphabet!r}")
        return int(self.lookup[code])

    def ids_of(self, letters: str) -> np.ndarray:
        """Ids of each letter of `letters` as uint8 (e.g. to locate the 20 amino acids in an embedding)."""
        return self.encode_bytes(np.frombuffer(letters.encode("ascii"), dtype=np.uint8)[None, :])[0]

    # -- encode / decode -------------------------------------------------------------------------
    def encode(self, sequences: Sequence[str] | np.ndarray, length: int | None = None) -> np.ndarray:
        """Encode sequences to a uint8 N × L id matrix, right-padded with `pad_id`.

        `sequences` is a list/array of str, an 'S' (bytes) numpy array, or an N × L uint8 matrix of
        ASCII codes (0 = padding). `length` fixes L (longer sequences are an error); by default L
        is the longest sequence. A letter outside the alphabet raises DataError naming the letter
        and the row.
        """
        if isinstance(sequences, np.ndarray) and sequences.dtype == np.uint8:
            matrix = sequences if sequences.ndim == 2 else sequences.reshape(1, -1)
        else:
            matrix = ascii_matrix(sequences)
        if length is not None:
            if matrix.shape[1] > length:
                too_long = np.flatnonzero(matrix[:, length:].any(axis=1))
                if too_long.size:
                    raise DataError(
                        f"vocab {self.name!r}: sequence {int(too_long[0])} is longer than the fixed length {length}"
                    )
                matrix = matrix[:, :length]
            elif matrix.shape[1] < length:
                matrix = np.pad(matrix, ((0, 0), (0, length - matrix.shape[1])))
        return self.encode_bytes(matrix)

    def encode_bytes(self, matrix: np.ndarray) -> np.ndarray:
        """Map an N × L uint8 matrix of ASCII codes (0 = padding) to ids; DataError on an unknown letter."""
        tokens = self.lookup[matrix]
        bad = tokens == _UNKNOWN
        if bad.any():
            row, col = np.argwhere(bad)[0]
            letter = chr(int(matrix[row, col]))
            raise DataError(
                f"vocab {self.name!r}: letter {letter!r} (sequence {int(row)}, position {int(col) + 1}) "
                f"is not in the alphabet {self.alphabet!r}; fix the data or choose another vocab.name"
            )
        return tokens

    def decode(self, tokens: np.ndarray, keep_pad: bool = False) -> list[str] | str:
        """Turn an N × L id matrix back into a list of strings (one 1-D row into one string).

        Padding is dropped unless `keep_pad`, which shows it as '-'.
        """
        tokens = np.asarray(tokens, dtype=np.uint8)
        single = tokens.ndim == 1
        matrix = tokens.reshape(1, -1) if single else tokens
        if matrix.size and int(matrix.max()) >= self.size:
            raise DataError(f"vocab {self.name!r}: id {int(matrix.max())} is outside 0..{self.size - 1}")
        letters = self.inverse[matrix]
        if keep_pad:
            letters = np.where(matrix == self.pad_id, np.uint8(ord(PAD_TOKEN)), letters)
        out = bytes_matrix_to_str(letters)
        return out[0] if single else out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, alphabet={self.alphabet!r}, size={self.size})"


class IUPACVocabProcessor(BaseVocabProcessor):
    """The IUPAC protein alphabet: 20 amino acids, the extended codes BZXJUO, and stop '*'.

    `extended=False` restricts it to the 20 standard letters plus '*'.
    """

    name = "IUPAC"

    def __init__(self, extended: bool = True, stop: bool = True, case_sensitive: bool = False):
        alphabet = IUPAC_AMINO_ACIDS + (IUPAC_EXTENDED_CODES if extended else "") + (STOP_CODE if stop else "")
        super().__init__(alphabet, case_sensitive=case_sensitive)


def ascii_matrix(sequences: Iterable[str] | np.ndarray) -> np.ndarray:
    """Stack sequences into an N × L uint8 matrix of ASCII codes, NUL-padded on the right.

    numpy's fixed-width bytes conversion does the padding in C; there is no per-row Python work
    beyond what building the input list already cost.
    """
    arr = sequences if isinstance(sequences, np.ndarray) else np.asarray(list(sequences), dtype=object)
    if arr.dtype.kind == "S":
        fixed = arr.reshape(-1)
    elif arr.size == 0:
        return np.zeros((0, 0), dtype=np.uint8)
    else:
        try:
            fixed = arr.reshape(-1).astype("U").astype("S")
        except UnicodeEncodeError:
            raise DataError("sequences contain non-ASCII characters; only IUPAC letters are allowed") from None
    width = fixed.dtype.itemsize
    if width == 0 or fixed.size == 0:
        return np.zeros((fixed.size, 0), dtype=np.uint8)
    return np.ascontiguousarray(fixed).view(np.uint8).reshape(fixed.size, width)


def bytes_matrix_to_str(matrix: np.ndarray) -> list[str]:
    """Inverse of `ascii_matrix`: an N × L uint8 ASCII matrix (NUL = end) to a list of str."""
    matrix = np.ascontiguousarray(matrix, dtype=np.uint8)
    if matrix.shape[1] == 0:
        return [""] * matrix.shape[0]
    fixed = matrix.view(f"S{matrix.shape[1]}").reshape(-1)
    return fixed.astype("U").tolist()


def register_vocab(name: str, factory: Callable[..., BaseVocabProcessor] | None = None):
    """Register a vocabulary factory under `name` (the seed's API); usable as a decorator.

    `factory(**vocab.params)` must return a `BaseVocabProcessor`.
    """
    return VOCABS.register(name, factory)


def get_vocab_processor(name: str = "IUPAC", **params: Any) -> BaseVocabProcessor:
    """Create the vocabulary registered as `name` with `params` (the plan's `vocab.params`)."""
    processor = VOCABS.create(name, **params)
    if not isinstance(processor, BaseVocabProcessor):
        raise TypeError(f"vocab {name!r} factory returned {type(processor).__name__}, not a BaseVocabProcessor")
    if not processor.name or processor.name == "base":
        processor.name = name
    return processor


register_vocab("IUPAC", IUPACVocabProcessor)
