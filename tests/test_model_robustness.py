"""Every built-in model, trained for real through `run_experiment`, stays in range on variants that
carry substitutions rare or absent in training.

The failure this guards against (issue 12): a default that divides a one-hot column by its batch
standard deviation turned a substitution seen once in training into an input of ~100 and test
predictions 3x outside the target range. The synthetic set is built to provoke exactly that: a
500-aa template, training rows with 1-15 substitutions from a common pool plus substitutions seen
in exactly one training row, and test rows with 10-15 common substitutions plus those rare ones,
substitutions never seen in training and stop codons.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest

from runner.core.experiment import run_experiment
from runner.core.metrics import spearman
from runner.data.importer import import_csv
from runner.plan.models import Plan

pytestmark = pytest.mark.core

AA = "ACDEFGHIKLMNPQRSTVWY"
# every built-in with its defaults, `linear` from zero, and the networks of mlp and cnn without their ridge part
CASES = [
    ("ridge", {}),
    ("linear", {}),
    ("linear", {"init": "zero"}),
    ("mlp", {}),
    ("cnn", {}),
    ("ge", {}),
    ("mlp", {"base": "none"}),
    ("cnn", {"base": "none"}),
]
# test predictions may leave the training target range by at most this share of its width on either side
MARGIN = 0.15


def _synthetic_rows(seed: int = 0):
    rng = np.random.default_rng(seed)
    length = 500
    template = "".join(rng.choice(list(AA), length))
    positions = rng.choice(np.arange(1, length + 1), 120, replace=False)
    common_pos, rare_pos, unseen_pos = positions[:60], positions[60:90], positions[90:]

    def other(pos: int, k: int) -> list[str]:
        return list(rng.choice([a for a in AA if a != template[pos - 1]], k, replace=False))

    pool = [(int(p), a) for p in common_pos for a in other(int(p), 3)]
    effect = {s: float(rng.normal(0, 1)) for s in pool}
    rare = [(int(p), a) for p in rare_pos for a in other(int(p), 1)]
    rare[::3] = [(p, "*") for p, _ in rare[::3]]  # a third of the rare ones are stop codons
    effect.update({s: float(rng.normal(-1, 1)) for s in rare})
    unseen = [(int(p), a) for p in unseen_pos for a in [*other(int(p), 1), "*"]]

    def variant(n_common: int, extra: list[tuple[int, str]]) -> list[tuple[int, str]]:
        taken = {p for p, _ in extra}
        chosen = [pool[i] for i in rng.permutation(len(pool))]
        subs = list(extra)
        for p, a in chosen:
            if len(subs) >= n_common + len(extra):
                break
            if p not in taken:
                subs.append((p, a))
                taken.add(p)
        return sorted(subs)

    def score(subs) -> float:
        additive = sum(effect.get(s, float(rng.normal(-1, 1))) for s in subs)
        # mildly non-linear, so that an additive model is not exact, yet it does not saturate: an additive
        # model then has no reason to leave the training range on rows with as many substitutions
        return float(additive + 0.03 * additive**2 + rng.normal(0, 0.2))

    rows = []
    for i in range(400):
        extra = [rare[i]] if i < len(rare) else []  # every rare substitution in exactly one training row
        rows.append((variant(int(rng.integers(1, 16)), extra), "train"))
    rows += [(variant(int(rng.integers(1, 16)), []), "val") for _ in range(100)]
    for i in range(150):
        extra = [rare[i % len(rare)], unseen[i % len(unseen)], unseen[(7 * i + 3) % len(unseen)]]
        extra = list({p: (p, a) for p, a in extra}.values())  # one substitution per position
        rows.append((variant(int(rng.integers(10, 16)), extra), "test"))
    out = []
    for subs, split in rows:
        mutant = ":".join(f"{template[p - 1]}{p}{a}" for p, a in subs)
        out.append((mutant, score(subs), split))
    return template, out


@pytest.fixture(scope="module")
def stress_db(tmp_path_factory) -> Path:
    template, rows = _synthetic_rows()
    folder = tmp_path_factory.mktemp("stress")
    with (folder / "stress.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["mutant", "DMS_score", "split"])
        writer.writerows(rows)
    import_csv(folder / "stress.csv", folder / "stress.sqlite", "STRESS", template, extra_columns=["split"])
    return folder / "stress.sqlite"


def _plan(db: Path, model: str, params: dict) -> Plan:
    doc = {
        "name": f"stress-{model}",
        "data": {"db": str(db)},
        "model": {"name": model, "params": params},
        "split": {"strategy": "column", "column": "split"},
        "metrics": ["spearman", "pearson"],
        "train": {"max_epochs": 6, "batch_size": 16, "seed": 0, "early_stopping_patience": 0},
    }
    return Plan.model_validate(doc)


@pytest.mark.slow
@pytest.mark.parametrize(("model", "params"), CASES, ids=[f"{m}-{p.get('base', 'default')}" for m, p in CASES])
def test_rare_and_unseen_substitutions_stay_in_range(tmp_path, stress_db, model, params):
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    exp = tmp_path / "exp"
    metrics = run_experiment(_plan(stress_db, model, params), exp)
    labels = np.load(exp / "artifacts/labels.npz")
    y_train, pred_test = labels["train_y_true"], labels["test_y_pred"]
    low, high = float(y_train.min()), float(y_train.max())
    width = high - low
    assert np.isfinite(pred_test).all()
    # what was kept (best.ckpt: with a fitted start, often the start itself) and the network after its
    # last epoch (last.ckpt), whatever selection kept: a trained network must be in range too
    checked = {f"kept ({metrics['selected']})": pred_test}
    if metrics["selected"] == "start" or metrics["epochs"] > 1:
        checked["last epoch"] = _last_epoch_test_predictions(exp, stress_db)
    for what, pred in checked.items():
        assert np.isfinite(pred).all(), what
        worst_low, worst_high = float(pred.min()), float(pred.max())
        print(
            f"\n{model} {params} {what}: training targets [{low:.2f}, {high:.2f}], test predictions "
            f"[{worst_low:.2f}, {worst_high:.2f}], test Spearman {spearman(labels['test_y_true'], pred):.3f}"
        )  # shown with -s
        assert worst_low >= low - MARGIN * width, (model, what, worst_low, low, high)
        assert worst_high <= high + MARGIN * width, (model, what, worst_high, low, high)
    # and it learnt the common substitutions' effects: the ranking of the test rows carries signal
    assert metrics["test"]["spearman"] > 0.3, metrics["test"]


def _last_epoch_test_predictions(exp: Path, db: Path) -> np.ndarray:
    """The test rows scored by the weights after the last epoch (ckpts/last.ckpt), in labels.npz's order."""
    import sqlite3

    import pyarrow as pa

    from runner.core.predict import load_predictor, mutant_text

    ids = np.load(exp / "artifacts/labels.npz")["test_ids"]
    with sqlite3.connect(db) as conn:
        mutant_of = dict(conn.execute("SELECT id, mutant FROM mutations WHERE split = 'test'").fetchall())
    predictor = load_predictor(exp, exp / "ckpts/last.ckpt")
    scored = predictor.score(mutant_text(pa.array([mutant_of[int(i)] for i in ids])))
    assert (scored.reason == 0).all()
    return scored.prediction


def test_stress_set_has_what_it_claims(stress_db):
    import sqlite3

    with sqlite3.connect(stress_db) as conn:
        rows = conn.execute("SELECT mutant, split, mut_num FROM mutations").fetchall()
    seen: dict[str, int] = {}
    for mutant, split, _ in rows:
        if split == "train":
            for s in mutant.split(":"):
                seen[s] = seen.get(s, 0) + 1
    test = [(m.split(":"), n) for m, split, n in rows if split == "test"]
    assert all(n >= 10 for _, n in test)
    assert all(any(s not in seen for s in subs) for subs, _ in test)  # every test row has an unseen substitution
    assert all(any(seen.get(s) == 1 for s in subs) for subs, _ in test)  # and one seen once
    assert any(s.endswith("*") and s not in seen for subs, _ in test for s in subs)
    assert any(s.endswith("*") and seen.get(s) == 1 for subs, _ in test for s in subs)
    assert len(rows) == 650 and max(len(m.split(":")) for m, _, _ in rows) >= 15
