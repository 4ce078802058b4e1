"""What the delivered model is (issue 21): metrics.json's `kept` in every view of a run, `train.select_by`,
and the far-worse warning. Real training on a slice of the real BLAT_ECOLX data and on a small synthetic
set built like a deep GFP scan (many substitutions through a saturating fitness curve)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from runner.cli import progress
from runner.core import kept
from runner.core.cli import main
from runner.core.selection import LEAVE_START_REL_GAIN
from runner.data.importer import import_csv

pytestmark = pytest.mark.core


def run(exp: Path, db: Path, model: str, limit: int | None = 800, **train) -> dict:
    plan = {
        "name": exp.name,
        "data": {"db": str(db), **({"limit": limit} if limit else {})},
        "model": {"name": model},
        "train": {"max_epochs": 2, "batch_size": 128, **train},
    }
    exp.parent.mkdir(parents=True, exist_ok=True)
    path = exp.parent / f"{exp.name}.json"
    path.write_text(json.dumps(plan))
    assert main([str(path), "--exp-dir", str(exp)]) == 0
    return json.loads((exp / "metrics/metrics.json").read_text())


def epochs(exp: Path) -> list[dict]:
    return [json.loads(line) for line in (exp / "metrics/metrics.jsonl").read_text().splitlines()]


def events(exp: Path) -> list[dict]:
    return [json.loads(line) for line in (exp / "logs/events.jsonl").read_text().splitlines()]


def test_a_kept_start_is_stated_in_metrics_log_events_view_and_tensorboard(tmp_path, blat_db, capsys):
    exp = tmp_path / "experiments" / "kept-mlp"
    got = run(exp, blat_db, "mlp")
    per_epoch, start = epochs(exp), got["start"]
    # the premise (tests/test_start_selection.py): no trained epoch of the default mlp is clearly above
    # its ridge start on this slice, so the start is delivered
    assert got["selected"] == "start" and got["best_epoch"] is None
    best = max(per_epoch, key=lambda e: (e["val_spearman"], -e["epoch"]))
    why = (
        f"no trained epoch clearly above the fitted start (ridge fit): best epoch {best['epoch'] + 1} "
        f"val_spearman {best['val_spearman']:.4f}, z {best['start_z']:.2f}"
    )
    assert got["kept"] == {
        "model": "start",
        "epoch": None,
        "by": "val_spearman",
        "value": start["val_spearman"],
        "best_trained": {"epoch": best["epoch"], "value": best["val_spearman"], "start_z": best["start_z"]},
        "why": why,
        "warning": None,
    }
    # the kept model's validation value is the evaluation's (the kept model IS the start)
    assert got["val"]["spearman"] == pytest.approx(got["kept"]["value"], abs=1e-9)
    (event,) = [e for e in events(exp) if e.get("phase") == "kept"]
    assert {k: event[k] for k in got["kept"]} == got["kept"]
    summary = f"kept: start (val_spearman {start['val_spearman']:.4f}): {why}"
    assert summary in (exp / "logs/train.log").read_text()
    assert summary in capsys.readouterr().err  # the core's stderr

    # the run view's summary, from the core's events
    view = progress.RunView("plain", tmp_path)
    view.event({"event": "attached", "experiment_id": "kept-mlp", "state": "running"})
    capsys.readouterr()
    view.finish({"test": got["test"], "val": got["val"]})
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"kept: start (val_spearman {start['val_spearman']:.4f}); best trained epoch {best['epoch'] + 1}, "
        f"val_spearman {best['val_spearman']:.4f}, not clearly above it (z {best['start_z']:.2f})"
    )

    # TensorBoard: the kept model's validation metrics after the last step, and a text tag
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(exp / "logs/tensorboard/version_0"), size_guidance={"tensors": 0})
    board.Reload()
    (point,) = board.Scalars("kept/val_spearman")
    assert point.value == pytest.approx(start["val_spearman"], abs=1e-6)
    assert point.step == torch.load(exp / "ckpts/last.ckpt", weights_only=True)["global_step"]
    (text,) = board.Tensors("kept/text_summary")
    assert text.tensor_proto.string_val[0].decode() == summary
    # the CSV log keeps the epochs' own columns
    header = (exp / "logs/csv/version_0/metrics.csv").read_text().splitlines()[0]
    assert header.split(",") == ["epoch", "step", "train_loss", "val_loss", "val_spearman"]


def test_ridge_is_kept_as_its_closed_form_fit(tmp_path, blat_db):
    got = run(tmp_path / "ridge", blat_db, "ridge")
    (only,) = epochs(tmp_path / "ridge")
    assert got["kept"] == {
        "model": "closed_form",
        "epoch": None,
        "by": "val_spearman",
        "value": only["val_spearman"],
        "best_trained": None,
        "why": "ridge is solved in closed form: its one pass is the model",
        "warning": None,
    }
    assert got["selected"] == "epoch" and got["best_epoch"] == 0  # the keys as they were


def test_a_model_without_a_fitted_start_keeps_its_best_epoch(tmp_path, blat_db):
    exp = tmp_path / "linear0"
    plan = {
        "name": "linear0",
        "data": {"db": str(blat_db), "limit": 800},
        "model": {"name": "linear", "params": {"init": "zero"}},
        "train": {"max_epochs": 2, "batch_size": 128},
    }
    (tmp_path / "p.json").write_text(json.dumps(plan))
    assert main([str(tmp_path / "p.json"), "--exp-dir", str(exp)]) == 0
    got = json.loads((exp / "metrics/metrics.json").read_text())
    per_epoch = epochs(exp)
    best = max(per_epoch, key=lambda e: (e["val_spearman"], -e["epoch"]))
    assert got["kept"] == {
        "model": "epoch",
        "epoch": best["epoch"],
        "by": "val_spearman",
        "value": best["val_spearman"],
        "best_trained": {"epoch": best["epoch"], "value": best["val_spearman"], "start_z": None},
        "why": f"epoch {best['epoch'] + 1}: the highest val_spearman of 2 trained epochs, {best['val_spearman']:.4f}",
        "warning": None,
    }
    assert got["best_epoch"] == best["epoch"]


def test_select_by_val_loss_follows_the_loss_with_a_relative_floor(tmp_path, blat_db):
    exp = tmp_path / "by-loss"
    got = run(exp, blat_db, "mlp", max_epochs=3, select_by="val_loss")
    per_epoch, start = epochs(exp), got["start"]
    assert got["kept"]["by"] == "val_loss" and "start_z" not in per_epoch[0]  # the z is Spearman's
    floor = start["val_loss"] * (1 - LEAVE_START_REL_GAIN)
    clear = [e for e in per_epoch if e["val_loss"] <= floor]
    best = min(per_epoch, key=lambda e: (e["val_loss"], e["epoch"]))
    assert got["kept"]["best_trained"] == {"epoch": best["epoch"], "value": best["val_loss"], "start_z": None}
    if clear:
        kept_epoch = min(clear, key=lambda e: (e["val_loss"], e["epoch"]))["epoch"]
        assert (got["kept"]["model"], got["kept"]["epoch"], got["best_epoch"]) == ("epoch", kept_epoch, kept_epoch)
    else:
        # on this slice the network moves the loss by well under 1%: the start stays, and says so
        assert (got["kept"]["model"], got["selected"]) == ("start", "start")
        assert got["kept"]["value"] == start["val_loss"]
        assert got["kept"]["why"] == (
            f"no trained epoch clearly better than the fitted start (ridge fit): best epoch {best['epoch'] + 1} "
            f"val_loss {best['val_loss']:.4f} against {start['val_loss']:.4f} (needs 1% lower)"
        )
    # what the progress view marks "best": only epochs clearly below the start, the last of them kept
    marked = [e for e in per_epoch if e["best"]]
    assert all(e in clear for e in marked)
    assert (marked[-1]["epoch"] if marked else None) == got["kept"]["epoch"]


def test_select_by_a_metric_not_reported_is_a_plan_error(tmp_path, blat_db, capsys):
    plan = {
        "name": "bad",
        "data": {"db": str(blat_db), "limit": 300},
        "model": {"name": "mlp"},
        "train": {"select_by": "val_auc"},
    }
    (tmp_path / "p.json").write_text(json.dumps(plan))
    assert main([str(tmp_path / "p.json"), "--exp-dir", str(tmp_path / "e")]) == 2
    assert (
        "metrics: train.select_by is 'val_auc': add 'auc' to metrics, or select by val_spearman or val_loss"
        in capsys.readouterr().err
    )


def test_a_plugin_metric_must_say_which_way_is_better(tmp_path, blat_db, capsys):
    from runner.core.metrics import METRICS, register_metric

    register_metric("spread_test", lambda y, p: float(np.std(p)))
    try:
        plan = {
            "name": "plugin",
            "data": {"db": str(blat_db), "limit": 300},
            "model": {"name": "mlp"},
            "metrics": ["spearman", "spread_test"],
            "train": {"select_by": "val_spread_test"},
        }
        (tmp_path / "p.json").write_text(json.dumps(plan))
        assert main([str(tmp_path / "p.json"), "--exp-dir", str(tmp_path / "e")]) == 2
    finally:
        METRICS.unregister("spread_test")
    assert (
        "train.select_by: metric 'spread_test' does not say whether higher or lower is better: set "
        "greater_is_better = True or False on its function" in capsys.readouterr().err
    )


# --- the far-worse warning ----------------------------------------------------------------------------


def record(epoch: int, loss: float, rho: float, mse: float, pearson: float) -> dict:
    return {"epoch": epoch, "val_loss": loss, "val_spearman": rho, "val": {"mse": mse, "pearson": pearson}}


def test_far_worse_names_the_metric_where_the_kept_model_is_worst():
    start = {"val_loss": 0.344, "val_spearman": 0.81, "val": {"mse": 0.344, "pearson": 0.70}}
    trained = [record(0, 0.30, 0.80, 0.30, 0.72), record(6, 0.087, 0.812, 0.087, 0.75)]
    assert kept.far_worse(start, trained, "val_spearman", "start") == (
        "the kept start's val_loss 0.344 is 4.0x trained epoch 7's 0.087 (at val_spearman 0.8100 against "
        "0.8120); train.select_by: val_loss would select on it"
    )
    # under a factor of two on the squared scale, and under 0.1 on a score: no warning
    near = [record(0, 0.18, 0.80, 0.18, 0.65)]
    assert kept.far_worse(start, near, "val_spearman", "start") is None
    # a score 0.1 below a trained epoch's is far worse
    assert kept.far_worse(start, [record(2, 0.3, 0.8, 0.3, 0.81)], "val_spearman", "start") == (
        "the kept start's val_pearson 0.7 is 0.110 below trained epoch 3's 0.81 (at val_spearman 0.8100 "
        "against 0.8000); train.select_by: val_pearson would select on it"
    )
    # the selection metric itself is not second-guessed: selecting by the loss, the MSE is what is far worse
    assert kept.far_worse(start, trained, "val_loss", "start") == (
        "the kept start's val_mse 0.344 is 4.0x trained epoch 7's 0.087 (at val_loss 0.3440 against 0.0870); "
        "train.select_by: val_mse would select on it"
    )


AA = "ACDEFGHIKLMNPQRSTVWY"


@pytest.fixture(scope="module")
def saturating_db(tmp_path_factory) -> Path:
    """2,000 variants of a 60-aa template with 1-15 substitutions from 80, whose additive effects pass
    through a steep sigmoid (a deep GFP scan's shape: most multi-mutants dead, a plateau of live ones):
    the additive ridge ranks them about as well as a network, while its squared error is far worse."""
    rng = np.random.default_rng(3)
    template = "".join(rng.choice(list(AA), 60))
    positions = rng.choice(np.arange(1, 61), 40, replace=False)
    pool = [(int(p), str(a)) for p in positions for a in rng.choice([x for x in AA if x != template[p - 1]], 2)]
    effect = {s: -abs(rng.normal(0.6, 0.5)) for s in pool}
    rows = []
    for _ in range(2000):
        chosen: dict[int, str] = {}
        n_subs = int(rng.integers(1, 16))
        for j in rng.permutation(len(pool)):
            chosen.setdefault(*pool[j])
            if len(chosen) == n_subs:
                break
        latent = 3.0 + sum(effect[s] for s in chosen.items())
        score = 3.0 / (1.0 + math.exp(-2.5 * latent)) + rng.normal(0, 0.05)
        rows.append((":".join(f"{template[p - 1]}{p}{a}" for p, a in sorted(chosen.items())), score))
    folder = tmp_path_factory.mktemp("saturating")
    with (folder / "sat.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["mutant", "DMS_score"])
        writer.writerows(rows)
    import_csv(folder / "sat.csv", folder / "sat.sqlite", "SATURATING", template)
    return folder / "sat.sqlite"


def test_a_kept_start_far_worse_on_the_loss_is_warned_about_and_select_by_val_loss_keeps_the_epoch(
    tmp_path, saturating_db
):
    # the reported case: by the validation Spearman the ridge start is kept (no epoch clearly above it)
    # while the trained epochs cut the validation loss to a third
    by_rho = run(tmp_path / "by-rho", saturating_db, "mlp", limit=None, max_epochs=3, batch_size=64)
    per_epoch, start = epochs(tmp_path / "by-rho"), by_rho["start"]
    assert by_rho["kept"]["model"] == "start"
    low = min(per_epoch, key=lambda e: e["val_loss"])
    assert start["val_loss"] / low["val_loss"] > 3
    warning = (
        f"the kept start's val_loss {start['val_loss']:.4g} is {start['val_loss'] / low['val_loss']:.1f}x trained "
        f"epoch {low['epoch'] + 1}'s {low['val_loss']:.4g} (at val_spearman {start['val_spearman']:.4f} against "
        f"{low['val_spearman']:.4f}); train.select_by: val_loss would select on it"
    )
    assert by_rho["kept"]["warning"] == warning
    assert f"WARNING runner.core.experiment: kept model: {warning}" in (tmp_path / "by-rho/logs/train.log").read_text()
    # selecting by the loss delivers that epoch: a third of the test error, at about the same test ranking
    by_loss = run(tmp_path / "by-loss", saturating_db, "mlp", limit=None, max_epochs=3, batch_size=64,
                  select_by="val_loss")  # fmt: skip
    assert (by_loss["kept"]["model"], by_loss["kept"]["epoch"]) == ("epoch", low["epoch"])
    assert by_loss["kept"]["warning"] is None
    assert by_loss["test"]["mse"] < by_rho["test"]["mse"] / 3
    assert abs(by_loss["test"]["spearman"] - by_rho["test"]["spearman"]) < 0.02


def test_why_names_the_rule_that_held_the_start():
    from types import SimpleNamespace

    rule = SimpleNamespace(by="val_spearman", greater=True, by_spearman=True, start={"val_spearman": 0.4355})
    history = [{"epoch": 0, "val_spearman": 0.4301, "start_z": -0.2}, {"epoch": 2, "val_spearman": 0.4359,
                                                                       "start_z": 1.25}]  # fmt: skip
    doc = kept.describe(rule, history, "start", None, closed_form=False, model_name="mlp", start_name="ridge fit")
    # one standard error above the start, but under the 0.001 floor (Bgl3 mlp, 8,000 variants, 4 epochs)
    assert doc["why"] == (
        "no trained epoch clearly above the fitted start (ridge fit): best epoch 3 val_spearman 0.4359, "
        "z 1.25 but +0.0004 (needs +0.001)"
    )
    assert kept.summary(doc) == f"kept: start (val_spearman 0.4355): {doc['why']}"
