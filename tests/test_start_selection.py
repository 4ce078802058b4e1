"""The untrained start is a checkpoint candidate like any epoch (issue 12).

Validation is scored once before the first optimiser step; ModelCheckpoint, early stopping and the
evaluation see that score. `mlp`/`cnn` start as their exact ridge fit (zero last layer), so when the
network only hurts on validation the kept model IS the ridge fit: same test metrics, same predictions.
Real training on a slice of the real BLAT_ECOLX data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from runner.core.cli import main
from runner.data.importer import build_demo_db


@pytest.fixture(scope="module")
def blat_db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("blat") / "blat.sqlite"
    build_demo_db(path)
    return path


def run(tmp_path: Path, db: Path, name: str, model: str, max_epochs: int = 2, **train) -> Path:
    plan = {
        "name": name,
        "data": {"db": str(db), "limit": 800},
        "model": {"name": model},
        "train": {"max_epochs": max_epochs, "batch_size": 128, **train},
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(plan))
    exp = tmp_path / name
    assert main([str(path), "--exp-dir", str(exp)]) == 0
    return exp


def metrics(exp: Path) -> dict:
    return json.loads((exp / "metrics/metrics.json").read_text())


def epochs(exp: Path) -> list[dict]:
    return [json.loads(line) for line in (exp / "metrics/metrics.jsonl").read_text().splitlines()]


def predictions(exp: Path) -> np.ndarray:
    return pd.read_parquet(exp / "artifacts/predictions.parquet").sort_values("id")["y_pred"].to_numpy()


def test_start_kept_when_the_network_only_hurts(tmp_path, blat_db):
    ridge = run(tmp_path, blat_db, "ridge", "ridge")
    mlp = run(tmp_path, blat_db, "mlp", "mlp")
    got, per_epoch = metrics(mlp), epochs(mlp)
    start = got["start"]
    # the premise: on this slice every trained epoch of the default mlp is below its ridge start on validation
    assert all(e["val_spearman"] < start["val_spearman"] for e in per_epoch), (start, per_epoch)
    assert got["selected"] == "start" and got["best_epoch"] is None
    assert torch.load(mlp / "ckpts/best.ckpt", weights_only=False)["global_step"] == 0
    # the kept model is the ridge fit: the evaluation, the predictions and the validation record agree
    assert got["test"]["spearman"] == pytest.approx(metrics(ridge)["test"]["spearman"], abs=1e-9)
    assert got["val"]["spearman"] == pytest.approx(start["val_spearman"], abs=1e-9)
    np.testing.assert_allclose(predictions(mlp), predictions(ridge), rtol=1e-5, atol=1e-5)
    # the start stays out of the per-epoch files: they hold trained epochs only, numbered from 0
    assert [e["epoch"] for e in per_epoch] == [0, 1]
    events = [json.loads(line) for line in (mlp / "logs/events.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [0, 1]
    # ridge has nothing to train: no start pass, its one epoch is the model
    assert metrics(ridge)["selected"] == "epoch" and "start" not in metrics(ridge)


def test_epoch_kept_when_training_helps(tmp_path, blat_db):
    # the same mlp with a smaller learning rate: its epochs edge past the ridge start on validation
    # (0.6809 vs 0.6805 on this slice), so a trained epoch is kept
    exp = run(tmp_path, blat_db, "mlp", "mlp", lr=3e-4)
    got = metrics(exp)
    kept = max(epochs(exp), key=lambda e: e["val_spearman"])
    assert kept["val_spearman"] > got["start"]["val_spearman"], (got["start"], epochs(exp))
    assert got["selected"] == "epoch" and got["best_epoch"] == kept["epoch"]
    assert got["val"]["spearman"] == pytest.approx(kept["val_spearman"], abs=1e-6)
    assert torch.load(exp / "ckpts/best.ckpt", weights_only=False)["global_step"] > 0


@pytest.mark.parametrize("model,params", [("linear", {}), ("mlp", {"base": "none"})])
def test_no_start_pass_without_a_fitted_start(tmp_path, blat_db, model, params):
    # a random (linear) or constant (a network alone, last layer at zero) start is no candidate
    plan = {
        "name": "nofit",
        "data": {"db": str(blat_db), "limit": 800},
        "model": {"name": model, "params": params},
        "train": {"max_epochs": 1, "batch_size": 128},
    }
    (tmp_path / "p.json").write_text(json.dumps(plan))
    assert main([str(tmp_path / "p.json"), "--exp-dir", str(tmp_path / "e")]) == 0
    got = metrics(tmp_path / "e")
    assert got["selected"] == "epoch" and got["best_epoch"] == 0 and "start" not in got


def test_resume_keeps_the_start_and_scores_it_once(tmp_path, blat_db):
    first = run(tmp_path, blat_db, "mlp", "mlp", max_epochs=1)
    before = metrics(first)
    assert before["selected"] == "start"
    # more epochs continue from last.ckpt: the start is not scored again, and best.ckpt still holds it
    # unless a new epoch beats it (here none does: see the test above)
    again = run(tmp_path, blat_db, "mlp", "mlp", max_epochs=2)
    after = metrics(again)
    assert [e["epoch"] for e in epochs(again)] == [0, 1]
    assert after["start"] == before["start"]
    assert after["selected"] == "start"
    assert after["test"] == before["test"]
    events = [json.loads(line) for line in (again / "logs/events.jsonl").read_text().splitlines()]
    assert any(e.get("phase") == "resume" for e in events)


def test_early_stopping_counts_the_start(tmp_path, blat_db):
    # patience 1: the start sets the best val_spearman and val_loss; the first epoch improves neither
    # (see the first test), so training stops after it instead of running to max_epochs
    exp = run(tmp_path, blat_db, "mlp", "mlp", max_epochs=5, early_stopping_patience=1)
    got = metrics(exp)
    assert got["selected"] == "start"
    per_epoch = epochs(exp)
    assert len(per_epoch) < 5, per_epoch
