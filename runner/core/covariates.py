"""`data.covariates`: numeric columns of each variant given to the model beside the plan's embedding.

The classic "augmented" model (Hsu et al. 2022, Nat. Biotechnol.: one-hot ridge plus a zero-shot
score) without a second data path: the batches stay token rows, and `CovariateEmbedding` wraps the
plan's embedding. `prepare` (the embedding hook, runner.core.embeddings) receives the covariate
values of the experiment's whole data set once, beside the tokens, and keeps them in a lookup by
token row (`runner.core.plm.RowIndex`: on the batches' device, no host loop per row); `forward`
returns the inner embedding's output with the standardised covariates appended:

- a pooled inner embedding (`out_len == 1`, the `plm` embedding: `[B, 1, C]`) gets them as K more
  channels: `[B, 1, C + K]`;
- a per-position one (one-hot, BLOSUM: `[B, L, C]`) gets one more position holding the K values in
  its first K channels (the rest zeros): `[B, L + 1, C]`; K > C is refused.

Models that flatten their input (ridge, linear, mlp, ge) so see the covariates as K more features;
`cnn` convolves over positions, where the extra one would be read as a residue, and is refused.

Standardisation: mean and standard deviation of the training rows only (a standard deviation of 0
counts as 1), kept as buffers of this module, so they are in the checkpoint and `infra predict`
applies the same ones to the covariates read from its input file. Missing values never reach this
module: the selection refuses them (runner.core.data.covariate_matrix), and so does prediction.
A sequence in several rows with different covariate values is refused: the lookup is by sequence,
and the model could not tell the rows apart anyway.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runner.core.embeddings import output_length
from runner.core.plm import RowIndex
from runner.core.registry import ParamError
from runner.errors import DataError


class CovariateEmbedding(nn.Module):
    """The plan's embedding (`inner`) with the covariates `names` appended (see the module docstring)."""

    def __init__(self, inner: nn.Module, names: list[str], embedding_name: str = "the embedding"):
        super().__init__()
        self.inner = inner
        self.names = list(names)
        k, channels = len(self.names), int(inner.dim)
        self.pooled = getattr(inner, "out_len", None) == 1
        if not self.pooled and k > channels:
            raise ParamError(
                f"data.covariates: {k} covariates do not fit the one extra position of embedding "
                f"{embedding_name!r}, which has {channels} channels; use at most {channels} covariates, "
                "or a pooled embedding (plm), which takes any number"
            )
        self.dim = channels + k if self.pooled else channels
        if self.pooled:
            self.out_len = 1
        # float64: a covariate of large magnitude keeps its small differences through the standardisation
        self.register_buffer("covariate_mean", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("covariate_std", torch.ones(k, dtype=torch.float64))
        self._rows = RowIndex(k)  # the prepared rows: raw values by token row
        self._scratch = RowIndex(k)  # rows given since (a predict chunk)

    def length_for(self, seq_len: int) -> int:
        """The output length for sequences of `seq_len` tokens (runner.core.embeddings.output_length)."""
        return 1 if self.pooled else output_length(self.inner, seq_len) + 1

    # -- the hooks

    def fit_standardisation(self, train_values: np.ndarray) -> None:
        """Mean and standard deviation of the training rows' covariates (std 0 → 1), into the buffers."""
        values = np.asarray(train_values, dtype=np.float64)
        if values.ndim != 2 or values.shape[1] != len(self.names) or not len(values):
            raise ValueError(f"covariates: training values of shape {values.shape} for {len(self.names)} columns")
        mean, std = values.mean(axis=0), values.std(axis=0)
        std[~(std > 0)] = 1.0  # a constant column: centred, not divided by zero
        self.covariate_mean.copy_(torch.from_numpy(mean))
        self.covariate_std.copy_(torch.from_numpy(std))

    def prepare(self, tokens: np.ndarray, templates: list[str], source=None, *, covariates=None, **options):
        """The embedding hook: the inner embedding's own `prepare` (with `options`, e.g. `device`), then
        `covariates` (float N × K, row-aligned with `tokens`) become the rows `forward` looks up."""
        inner_prepare = getattr(self.inner, "prepare", None)
        result = inner_prepare(tokens, templates, source, **options) if callable(inner_prepare) else True
        if covariates is None:
            raise ValueError("CovariateEmbedding.prepare needs covariates= (the rows' covariate values)")
        self.set_rows(tokens, covariates)
        return result

    def set_rows(self, tokens: np.ndarray, values: np.ndarray, *, scratch: bool = False) -> None:
        """Make `values` (raw, N × K) the covariates of the token rows `tokens`: the prepared rows, or
        with `scratch` the rows of one predict chunk (replacing the previous chunk's)."""
        tokens = np.ascontiguousarray(tokens, dtype=np.uint8)
        values = np.asarray(values, dtype=np.float64).reshape(len(tokens), len(self.names))
        if not np.isfinite(values).all():
            raise DataError("data.covariates: a covariate value is missing or not finite; every row needs one")
        tokens, values = _unique_rows(tokens, values)
        index = RowIndex(len(self.names))
        index.replace(torch.from_numpy(tokens), torch.from_numpy(values))
        if scratch:
            self._scratch = index
        else:
            self._rows = index

    def _values(self, tokens: torch.Tensor) -> torch.Tensor:
        idx, found = self._rows.find(tokens)
        values = self._rows.features[idx] if len(self._rows) else None
        if not bool(found.all()) and len(self._scratch):
            idx2, found2 = self._scratch.find(tokens)
            extra = found2 & ~found
            if bool(extra.any()):
                chunk = self._scratch.features[idx2]
                values = chunk if values is None else torch.where(extra[:, None], chunk, values)
            found = found | found2
        if not bool(found.all()) or values is None:
            raise DataError(
                f"data.covariates: {int((~found).sum())} sequence(s) reached the model without covariate values "
                f"({', '.join(self.names)}); give them per row (infra predict: as columns of the input file)"
            )
        return values

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.inner(tokens)
        z = ((self._values(tokens) - self.covariate_mean) / self.covariate_std).to(x.dtype)
        if self.pooled:
            return torch.cat([x, z[:, None, :].expand(-1, x.shape[1], -1)], dim=2)
        extra = F.pad(z, (0, x.shape[2] - z.shape[1]))[:, None, :]
        return torch.cat([x, extra], dim=1)


def _unique_rows(tokens: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each distinct token row once, with its values; DataError when one appears with different values."""
    if not len(tokens):
        return tokens, values
    keys = tokens.view(np.dtype((np.void, tokens.shape[1]))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    differs = np.any(values != values[first][inverse], axis=1)
    if differs.any():
        n = int(np.unique(inverse[differs]).size)
        raise DataError(
            f"data.covariates: {n} sequence(s) appear in several rows with different covariate values; the "
            "model sees a sequence once, so each needs one value per covariate: keep one row per sequence "
            "(data.where) or give the rows equal values"
        )
    return tokens[first], values[first]
