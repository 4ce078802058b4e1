"""Embedding registry: per-batch expansion of the uint8 token matrix into float features.

An embedding is an `nn.Module` mapping a `[B, L]` integer token batch to `[B, L', C]` floats and
exposing `dim` (= C). It runs on the training device for one batch at a time; the data set itself
stays a compact token matrix (DESIGN §8). A factory is called as `factory(vocab, **params)` where
`vocab` is the plan's vocab processor (see `vocab_alphabet` for what is read from it).

Optional, for embeddings too costly to run per batch (the built-in `plm`, runner.core.plm):
`out_len` (int): the length L' of its output when it is not the sequence length (1 for pooled
features; the model is then built for that length); `prepare(tokens, templates, source, *, device)`:
called once before training with the experiment's whole token matrix (numpy uint8 `[N, L]`), the
wild-type templates and each row's index into them, so the features can be computed (or read from
a cache) once and `forward` only looks rows up.

With `data.covariates` the plan's embedding is wrapped (runner.core.covariates.CovariateEmbedding):
the wrapper's `prepare` also takes `covariates=` (the rows' values, float `[N, K]`), calls the inner
embedding's own `prepare` as above (without them), and appends the standardised covariates to the
inner output (K channels of a pooled output, one extra position of a per-position one).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from runner.core.registry import Registry

log = logging.getLogger(__name__)

EMBEDDINGS: Registry[nn.Module] = Registry("embedding")


def register_embedding(name: str, factory: Callable[..., nn.Module] | None = None):
    """Register an embedding factory `factory(vocab, **params) -> nn.Module` (also as a decorator)."""
    return EMBEDDINGS.register(name, factory)


def vocab_alphabet(vocab) -> list[str]:
    """Token of every id of `vocab` (index = id; index 0 is padding, shown as "")."""
    return ["", *vocab.alphabet]


def vocab_size(vocab) -> int:
    """Number of ids including padding (rows of an embedding table)."""
    return int(getattr(vocab, "size", len(vocab.alphabet) + 1))


class OneHot(nn.Module):
    """One-hot over the vocabulary; the padding id 0 maps to an all-zero row."""

    def __init__(self, n_tokens: int):
        super().__init__()
        self.n_tokens = int(n_tokens)
        self.dim = self.n_tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = F.one_hot(tokens.long(), self.n_tokens).float()
        out[..., 0] = 0.0  # id 0 is padding: carries no signal
        return out


# BLOSUM62 (Henikoff & Henikoff 1992), rows/columns in this order.
_BLOSUM_ORDER = "ARNDCQEGHILKMFPSTWYVBZX*"
_BLOSUM62 = """
 4 -1 -2 -2  0 -1 -1  0 -2 -1 -1 -1 -1 -2 -1  1  0 -3 -2  0 -2 -1  0 -4
-1  5  0 -2 -3  1  0 -2  0 -3 -2  2 -1 -3 -2 -1 -1 -3 -2 -3 -1  0 -1 -4
-2  0  6  1 -3  0  0  0  1 -3 -3  0 -2 -3 -2  1  0 -4 -2 -3  3  0 -1 -4
-2 -2  1  6 -3  0  2 -1 -1 -3 -4 -1 -3 -3 -1  0 -1 -4 -3 -3  4  1 -1 -4
 0 -3 -3 -3  9 -3 -4 -3 -3 -1 -1 -3 -1 -2 -3 -1 -1 -2 -2 -1 -3 -3 -2 -4
-1  1  0  0 -3  5  2 -2  0 -3 -2  1  0 -3 -1  0 -1 -2 -1 -2  0  3 -1 -4
-1  0  0  2 -4  2  5 -2  0 -3 -3  1 -2 -3 -1  0 -1 -3 -2 -2  1  4 -1 -4
 0 -2  0 -1 -3 -2 -2  6 -2 -4 -4 -2 -3 -3 -2  0 -2 -2 -3 -3 -1 -2 -1 -4
-2  0  1 -1 -3  0  0 -2  8 -3 -3 -1 -2 -1 -2 -1 -2 -2  2 -3  0  0 -1 -4
-1 -3 -3 -3 -1 -3 -3 -4 -3  4  2 -3  1  0 -3 -2 -1 -3 -1  3 -3 -3 -1 -4
-1 -2 -3 -4 -1 -2 -3 -4 -3  2  4 -2  2  0 -3 -2 -1 -2 -1  1 -4 -3 -1 -4
-1  2  0 -1 -3  1  1 -2 -1 -3 -2  5 -1 -3 -1  0 -1 -3 -2 -2  0  1 -1 -4
-1 -1 -2 -3 -1  0 -2 -3 -2  1  2 -1  5  0 -2 -1 -1 -1 -1  1 -3 -1 -1 -4
-2 -3 -3 -3 -2 -3 -3 -3 -1  0  0 -3  0  6 -4 -2 -2  1  3 -1 -3 -3 -1 -4
-1 -2 -2 -1 -3 -1 -1 -2 -2 -3 -3 -1 -2 -4  7 -1 -1 -4 -3 -2 -2 -1 -2 -4
 1 -1  1  0 -1  0  0  0 -1 -2 -2  0 -1 -2 -1  4  1 -3 -2 -2  0  0  0 -4
 0 -1  0 -1 -1 -1 -1 -2 -2 -1 -1 -1 -1 -2 -1  1  5 -2 -2  0 -1 -1  0 -4
-3 -3 -4 -4 -2 -2 -3 -2 -2 -3 -2 -3 -1  1 -4 -3 -2 11  2 -3 -4 -3 -2 -4
-2 -2 -2 -3 -2 -1 -2 -3  2 -1 -1 -2 -1  3 -3 -2 -2  2  7 -1 -3 -2 -1 -4
 0 -3 -3 -3 -1 -2 -2 -3 -3  3  1 -2  1 -1 -2 -2  0 -3 -1  4 -3 -2 -1 -4
-2 -1  3  4 -3  0  1 -1  0 -3 -4  0 -3 -3 -2  0 -1 -4 -3 -3  4  1 -1 -4
-1  0  0  1 -3  3  4 -2  0 -3 -3  1 -1 -3 -1  0 -1 -3 -2 -2  1  4 -1 -4
 0 -1 -1 -1 -2 -1 -1 -1 -1 -1 -1 -1 -1 -1 -2  0  0 -2 -1 -1 -1 -1 -1 -4
-4 -4 -4 -4 -4 -4 -4 -4 -4 -4 -4 -4 -4 -4 -4 -4 -4 -4 -4 -4 -4 -4 -4  1
"""


def blosum62_table(alphabet: list[str]) -> torch.Tensor:
    """`[len(alphabet), 24]` BLOSUM62 rows for each token (scaled by 1/4); unknown tokens and padding get zeros."""
    rows = [[float(v) for v in line.split()] for line in _BLOSUM62.strip().splitlines()]
    matrix = torch.tensor(rows) / 4.0
    table = torch.zeros(len(alphabet), len(_BLOSUM_ORDER))
    for idx, token in enumerate(alphabet):
        key = token.upper()
        if idx > 0 and len(key) == 1 and key in _BLOSUM_ORDER:
            table[idx] = matrix[_BLOSUM_ORDER.index(key)]
    return table


class TableEmbedding(nn.Module):
    """A fixed (non-trained) lookup table per token id, e.g. BLOSUM62 substitution rows."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table.float())
        self.dim = int(table.shape[1])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens.long()]


@register_embedding("onehot")
def onehot(vocab) -> nn.Module:
    """One-hot over the vocabulary ids (C = vocabulary size)."""
    return OneHot(vocab_size(vocab))


@register_embedding("blosum62")
def blosum62(vocab, with_onehot: bool = False) -> nn.Module:
    """BLOSUM62 substitution profile per residue (C = 24), optionally concatenated with the one-hot."""
    table = blosum62_table(vocab_alphabet(vocab))
    if with_onehot:
        eye = torch.eye(table.shape[0])
        eye[0, 0] = 0.0
        table = torch.cat([eye, table], dim=1)
    return TableEmbedding(table)


@register_embedding("plm")
def plm(vocab, model: str, layer: int = -1, pooling: str = "mean", batch_size: int = 32) -> nn.Module:
    """Pooled protein language-model features (C = the model's hidden size), one row per variant:
    `model` from the node's model store, hidden states of `layer` (-1: the last), `pooling` "mean"
    (all residues) or "mutated" (the mutated positions; a wild-type row: all residues). Computed
    once per data set and cached (runner.core.plm); the output is `[B, 1, C]`."""
    from runner.core.plm import PLMEmbedding  # transformers is imported only when a pLM is loaded

    return PLMEmbedding(vocab, model, layer=layer, pooling=pooling, batch_size=batch_size)


def output_length(embedding: nn.Module, seq_len: int) -> int:
    """The length of the embedding's output for sequences of `seq_len` tokens: its `length_for(seq_len)`
    or its `out_len` if it has one (runner.core.covariates adds a position to a per-position embedding)."""
    length_for = getattr(embedding, "length_for", None)
    if callable(length_for):
        return int(length_for(seq_len))
    out_len = getattr(embedding, "out_len", None)
    return int(out_len) if isinstance(out_len, int) and out_len > 0 else int(seq_len)


def create_embedding(name: str, vocab, params: dict | None = None) -> nn.Module:
    """Build the named embedding for `vocab`; the result has a `dim` attribute."""
    EMBEDDINGS.check_params(name, params or {}, "embeddings.params", fixed=("vocab",))
    module = EMBEDDINGS.get(name)(vocab, **(params or {}))
    if not isinstance(getattr(module, "dim", None), int):
        raise TypeError(f"embedding {name!r} must set an integer attribute 'dim' (its output channels)")
    return module
