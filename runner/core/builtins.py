"""Importing this module registers every built-in vocab, embedding, model, metric and split."""

from __future__ import annotations

from runner.core import embeddings, metrics, models, splits, vocab
from runner.core.registry import Registry


def registries() -> dict[str, Registry]:
    """The five registries by kind name."""
    return {
        "vocab": vocab.VOCABS,
        "embedding": embeddings.EMBEDDINGS,
        "model": models.MODELS,
        "metric": metrics.METRICS,
        "split": splits.SPLITS,
    }
