"""Are validation and test the same kind of problem? Measured from the data, once per run.

A one-hot model learns one weight per (position, residue): at a position no training variant mutates
it has nothing, and predicts the same value for every variant there (ProteinGym's `fold_modulo_5`:
test Spearman undefined in 4 of 5 folds). The regime of a split is therefore the share of its variants
that carry a mutated position no training variant mutates. Validation picks the kept model, ridge's
alpha and the end of training; when its share and the test's differ by REGIME_GAP or more, those
choices optimise another problem than the one the test measures, and the run says so (train.log and a
`{"phase": "warning"}` progress event).

The built-in position splits (`modulo`, `contiguous`, and a `column` of fold numbers that the data
shows to be position-wise: runner.core.splits) draw validation from held-out training positions, so
they pass; a random validation share next to a position-held-out test does not.
"""

from __future__ import annotations

import numpy as np

# Half of the variants of one split in a regime the other barely samples: a random split of BLAT
# has 0% unseen positions in both; ProteinGym's modulo folds with random validation, 0% and 100%.
REGIME_GAP = 0.5
CHUNK_ROWS = 1 << 16  # rows compared with their template at a time (bounded memory on 1M variants)


def mutated_mask(variants, rows: np.ndarray) -> np.ndarray:
    """rows × L booleans: where each of `rows` differs from its template (its mutated positions)."""
    tokens = variants.tokens[rows]
    width = tokens.shape[1]
    wild = variants.vocab.encode(list(variants.templates), length=width)
    return tokens != wild[np.asarray(variants.source)[rows]]


def unseen_shares(variants, split: dict[str, np.ndarray]) -> dict[str, float | None]:
    """For `val` and `test`: the share of their mutated variants with a mutated position that no training
    variant mutates (positions counted per template); None for a split without mutated variants."""
    n_sources, width = len(variants.templates), variants.tokens.shape[1]
    seen = np.zeros((n_sources, width), dtype=bool)
    train = np.asarray(split["train"])
    sources = np.asarray(variants.source)
    for start in range(0, len(train), CHUNK_ROWS):
        rows = train[start : start + CHUNK_ROWS]
        mask = mutated_mask(variants, rows)
        for code in np.unique(sources[rows]):
            seen[code] |= mask[sources[rows] == code].any(axis=0)
    shares: dict[str, float | None] = {}
    for name in ("val", "test"):
        rows = np.asarray(split.get(name, []))
        unseen = mutated = 0
        for start in range(0, len(rows), CHUNK_ROWS):
            chunk = rows[start : start + CHUNK_ROWS]
            mask = mutated_mask(variants, chunk)
            mutated += int(mask.any(axis=1).sum())
            unseen += int((mask & ~seen[sources[chunk]]).any(axis=1).sum())
        shares[name] = unseen / mutated if mutated else None
    return shares


def regime_warning(shares: dict[str, float | None]) -> str | None:
    """One line when validation and test differ by REGIME_GAP or more in their unseen-position share."""
    val, test = shares.get("val"), shares.get("test")
    if val is None or test is None or abs(val - test) < REGIME_GAP:
        return None
    return (
        f"validation and test are different problems: {test:.0%} of test variants carry a position no training "
        f"variant mutates, against {val:.0%} of validation variants; the kept model, ridge's alpha and early "
        "stopping follow validation, so they optimise the other regime (split positions as the test does: "
        "split.strategy modulo or contiguous, or a position-wise fold column)"
    )
