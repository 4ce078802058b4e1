"""Real training on a small slice of the real BLAT_ECOLX data: the full experiment layout, resume,
classification, exit codes and the graceful SIGTERM stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from runner.core.cli import main
from tests.e2e import wait_for

pytestmark = pytest.mark.core

REPO = Path(__file__).resolve().parent.parent

LAYOUT = [
    "config/plan.json",
    "config/query.json",
    "config/environment.json",
    "data/selected.parquet",
    "splits/train.npy",
    "splits/val.npy",
    "splits/test.npy",
    "splits/split.json",
    "logs/train.log",
    "metrics/metrics.jsonl",
    "metrics/metrics.json",
    "ckpts/last.ckpt",
    "ckpts/best.ckpt",
    "artifacts/model.pth",
    "artifacts/labels.npz",
    "artifacts/predictions.parquet",
    "artifacts/visualization/learning_curves.png",
    "artifacts/visualization/predicted_vs_measured.png",
    "artifacts/visualization/single_mutants.png",
    "logs/csv/version_0/metrics.csv",
    "logs/tensorboard/version_0/hparams.yaml",
    "logs/events.jsonl",
]


def write_plan(path: Path, db: Path, **sections) -> Path:
    plan = {
        "name": "smoke",
        "data": {"db": str(db), "limit": 800},
        "model": {"name": "linear"},
        "train": {"max_epochs": 2, "batch_size": 128},
    }
    for key, value in sections.items():
        plan[key] = {**plan.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(json.dumps(plan))
    return path


def test_smoke_layout_and_resume(tmp_path, blat_db, capsys):
    exp = tmp_path / "exp"
    plan = write_plan(
        tmp_path / "plan.json", blat_db, metrics=["spearman", "pearson", "mse", "rmse", "mae", "ndcg", "auc", "mcc"]
    )
    db_bytes = blat_db.read_bytes()
    assert main([str(plan), "--exp-dir", str(exp)]) == 0
    for rel in LAYOUT:
        assert (exp / rel).is_file(), rel
    assert blat_db.read_bytes() == db_bytes  # the core never writes the database

    metrics = json.loads((exp / "metrics/metrics.json").read_text())
    assert set(metrics["test"]) == {"spearman", "pearson", "mse", "rmse", "mae", "ndcg", "auc", "mcc"}
    assert metrics["n"]["train"] + metrics["n"]["val"] + metrics["n"]["test"] == 800
    assert metrics["test"]["spearman"] > 0.2  # a real signal even after two epochs on 800 variants
    assert metrics["training_seconds"] > 0 and metrics["samples_per_second"] > 0

    epochs = [json.loads(line) for line in (exp / "metrics/metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert all("train_loss" in e and "val_loss" in e and "spearman" in e["val"] for e in epochs)
    events = [json.loads(line) for line in (exp / "logs" / "events.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [0, 1]

    preds = pd.read_parquet(exp / "artifacts/predictions.parquet")
    assert list(preds.columns[:5]) == ["id", "mutant", "mut_num", "split", "y_true"] or "y_pred" in preds.columns
    assert set(preds["split"]) == {"train", "val", "test"} and len(preds) == 800
    test_ids = np.load(exp / "splits/test.npy")
    assert sorted(preds.loc[preds.split == "test", "id"]) == sorted(test_ids.tolist())
    labels = np.load(exp / "artifacts/labels.npz")
    assert labels["test_y_pred"].shape == labels["test_ids"].shape
    query = json.loads((exp / "config/query.json").read_text())
    assert "SELECT" in query["sql"].upper() and "params" in query
    assert (exp / "artifacts/visualization/predicted_vs_measured.png").read_bytes()[:4] == b"\x89PNG"

    # resume: more epochs continue from last.ckpt instead of starting over
    plan2 = write_plan(tmp_path / "plan2.json", blat_db, train={"max_epochs": 3})
    assert main([str(plan2), "--exp-dir", str(exp)]) == 0
    epochs = [json.loads(line) for line in (exp / "metrics/metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert any(
        e.get("phase") == "resume" for e in map(json.loads, (exp / "logs" / "events.jsonl").read_text().splitlines())
    )
    # config/plan.json is written only once (the host's copy is authoritative)
    assert json.loads((exp / "config/plan.json").read_text())["train"]["max_epochs"] == 2


@pytest.mark.parametrize("model,embedding", [("mlp", "blosum62"), ("cnn", "onehot")])
def test_other_models_train(tmp_path, blat_db, model, embedding):
    plan = write_plan(
        tmp_path / "plan.json",
        blat_db,
        model={"name": model},
        embeddings={"name": embedding},
        train={"max_epochs": 1},
        data={"transform": "standardize"},
    )
    assert main([str(plan), "--exp-dir", str(tmp_path / "exp"), "--limit-batches", "3"]) == 0
    metrics = json.loads((tmp_path / "exp/metrics/metrics.json").read_text())
    assert metrics["transform"]["name"] == "standardize"
    assert metrics["test"]["spearman"] is not None


def test_classification(tmp_path, blat_db):
    plan = write_plan(
        tmp_path / "plan.json",
        blat_db,
        data={"target": "DMS_score_bin"},
        metrics=["auc", "mcc", "spearman"],
        train={"max_epochs": 2, "early_stopping_patience": 0},
    )
    assert main([str(plan), "--exp-dir", str(tmp_path / "exp")]) == 0
    metrics = json.loads((tmp_path / "exp/metrics/metrics.json").read_text())
    assert metrics["task"] == "classification"
    assert 0.5 < metrics["test"]["auc"] <= 1.0
    preds = pd.read_parquet(tmp_path / "exp/artifacts/predictions.parquet")
    assert preds["y_pred"].between(0, 1).all()  # P(class 1)


def test_bad_plan_and_data_exit_2(tmp_path, blat_db, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"name": "x", "data": {"db": str(blat_db)}, "model": {"name": "linear"}, "train": {"lr": -1}})
    )
    assert main([str(bad), "--exp-dir", str(tmp_path / "e1")]) == 2
    assert "train.lr" in capsys.readouterr().err
    plan = write_plan(tmp_path / "p.json", blat_db, model={"name": "transformer9000"})
    assert main([str(plan), "--exp-dir", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'transformer9000'" in err and "linear" in err
    plan = write_plan(tmp_path / "p2b.json", blat_db, model={"name": "mlp", "params": {"hiden": [8]}})
    assert main([str(plan), "--exp-dir", str(tmp_path / "e2b")]) == 2
    err = capsys.readouterr().err
    assert "model.params: model 'mlp' has no parameter 'hiden'; it takes: hidden, dropout, base" in err
    assert not (tmp_path / "e2b/data/selected.parquet").exists()  # refused before reading the data
    plan = write_plan(tmp_path / "p3.json", blat_db, data={"where": [{"column": "mut_num", "op": ">", "value": 5}]})
    assert main([str(plan), "--exp-dir", str(tmp_path / "e3")]) == 2
    assert "empty" in capsys.readouterr().err


def test_main_leaves_no_log_handler_behind(tmp_path, blat_db, capsys):
    # main() logs to the stderr of its call; run in-process (as here, where capsys closes that stream
    # after the test), a handler left behind made every later log record a "--- Logging error ---".
    import logging

    runner_log = logging.getLogger("runner")
    before = (list(runner_log.handlers), runner_log.level)
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"name": "x", "data": {"db": str(blat_db)}, "model": {"name": "linear"}, "train": {"lr": -1}})
    )
    assert main([str(bad), "--exp-dir", str(tmp_path / "e1")]) == 2
    assert (list(runner_log.handlers), runner_log.level) == before


def test_sigterm_stops_gracefully(tmp_path, blat_db):
    # the gate model (tests/gate_model.py) holds the training inside its first step until the SIGTERM,
    # which opens the gate and reaches the core's handler: the step finishes, last.ckpt is saved
    work = tmp_path / "work"
    (work / "model").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "gate_model.py", work / "model" / "gate.py")
    exp = tmp_path / "exp"
    plan = write_plan(
        tmp_path / "plan.json",
        blat_db,
        model={"name": "gate", "params": {"after_checkpoint": False}},
        train={"max_epochs": 3, "batch_size": 32, "early_stopping_patience": 0},
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner.core", str(plan), "--exp-dir", str(exp), "--workdir", str(work)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: (exp / "metrics" / ".gate-waiting").exists() or proc.poll() is not None, 120, "the gate")
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert (exp / "ckpts/last.ckpt").is_file()
    assert "cancelled" in err
    assert not (exp / "metrics/metrics.json").exists()


def test_experiments_one_after_another_in_one_process(tmp_path, blat_db):
    # what a study slot does: typed plans, one DataSource handing the same variants to every point,
    # the experiment id from the caller; a point matches the same plan run alone, and nothing of a run
    # stays behind in the process
    import logging

    import matplotlib.pyplot as plt
    import torch

    from runner.core.experiment import run_experiment
    from runner.core.sources import DataSource
    from runner.plan.issues import plan_from_document

    class Shared(DataSource):
        def __init__(self):
            super().__init__()
            self.reads, self.cached = 0, None

        def variants(self, plan):
            if self.cached is None:
                self.reads += 1
                self.cached = super().variants(plan)
            return self.cached

    doc = json.loads(write_plan(tmp_path / "plan.json", blat_db).read_text())
    plan = plan_from_document(doc, "plan")
    strict = plan_from_document({**doc, "train": {**doc["train"], "deterministic": True}}, "plan")

    def process_state():
        loggers = [logging.getLogger(n) for n in ("runner", "lightning", "lightning.pytorch", "infra_ext")]
        return (
            [(list(lg.handlers), lg.level) for lg in loggers],
            torch.are_deterministic_algorithms_enabled(),
            os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            plt.get_fignums(),
        )

    before = process_state()
    shared = Shared()
    first = run_experiment(strict, tmp_path / "a", data=shared, experiment_id="study-0")
    second = run_experiment(plan, tmp_path / "b", data=shared, experiment_id="study-1")
    assert process_state() == before
    assert shared.reads == 1 and first["n"] == second["n"]
    alone = run_experiment(plan, tmp_path / "alone")
    assert second["test"] == alone["test"] and second["val"] == alone["val"]
    for name, experiment_id in (("a", "study-0"), ("b", "study-1"), ("alone", "alone")):
        events = [json.loads(line) for line in (tmp_path / name / "logs/events.jsonl").read_text().splitlines()]
        assert {e["experiment_id"] for e in events} == {experiment_id}
    assert (tmp_path / "a/data/selected.parquet").read_bytes() == (
        tmp_path / "alone/data/selected.parquet"
    ).read_bytes()
    with pytest.raises(TypeError, match="takes a runner.plan.models.Plan"):
        run_experiment(doc, tmp_path / "dict")
