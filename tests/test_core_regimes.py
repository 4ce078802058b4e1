"""Validation in the test's regime, undefined metrics with their reason, and `data.sample` (issue 21).

Real data: a ProteinGym-shaped folder (tests/conftest.py, real BLAT_ECOLX variants with ProteinGym's
fold columns) and the bundled BLAT_ECOLX set.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from runner.core.cli import main
from runner.core.data import load_variants, sample_keys
from runner.core.metrics import undefined_reason
from runner.core.regimes import REGIME_GAP, regime_warning
from runner.core.splits import contiguous_folds, make_split, positionwise
from runner.data.importer import DEMO_CSV, DEMO_TEMPLATE, import_csv
from runner.errors import PlanError
from runner.plan.load import load_plan
from runner.plan.models import DataSpec, SplitSpec
from tests.conftest import make_proteingym_folder

pytestmark = pytest.mark.core


@pytest.fixture(scope="module")
def pg_db(tmp_path_factory) -> Path:
    from runner.data.proteingym import import_proteingym

    root = tmp_path_factory.mktemp("pg")
    db = root / "pg.sqlite"
    import_proteingym(make_proteingym_folder(root / "pg"), db, ["BLAT_ECOLX_Stiffler_2015"])
    return db


def train(tmp_path: Path, db: Path, name: str, model: str = "ridge", **sections) -> tuple[int, Path]:
    plan = {"name": name, "data": {"db": str(db)}, "model": {"name": model}, "train": {"max_epochs": 1}}
    for key, value in sections.items():
        plan[key] = {**plan.get(key, {}), **value}
    (tmp_path / f"{name}.json").write_text(json.dumps(plan))
    return main([str(tmp_path / f"{name}.json"), "--exp-dir", str(tmp_path / name)]), tmp_path / name


def metrics(exp: Path) -> dict:
    return json.loads((exp / "metrics/metrics.json").read_text())


def events(exp: Path, phase: str) -> list[dict]:
    lines = (exp / "logs/events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("phase") == phase]


def positions(exp: Path, name: str) -> set[int]:
    ids = np.load(exp / f"splits/{name}.npy")
    frame = pd.read_parquet(exp / "data/selected.parquet")
    mutants = frame.set_index("id").loc[ids, "mutant"]
    return {int(m[1:-1]) for m in mutants}


# --- which fold columns are position-wise ------------------------------------------------------------


def test_position_wise_folds_are_recognised_from_the_rows_not_the_name(pg_db):
    variants = load_variants(DataSpec(db=str(pg_db)))
    frame = variants.frame
    assert positionwise(variants, frame["fold_modulo_5"].to_numpy())
    assert positionwise(variants, frame["fold_contiguous_5"].to_numpy())
    assert not positionwise(variants, frame["fold_random_5"].to_numpy())
    assert not contiguous_folds(variants, frame["fold_modulo_5"].to_numpy())
    # the same numbers under another name are the same folds; shuffled across rows they are not
    shuffled = np.random.default_rng(0).permutation(frame["fold_modulo_5"].to_numpy())
    assert not positionwise(variants, shuffled)


def test_contiguous_folds_are_blocks_within_each_template():
    """A multi-template set's contiguous folds start again at every template: still one block per fold
    and template (counting the change at the template boundary called them scattered)."""
    from types import SimpleNamespace

    pos = np.tile(np.repeat(np.arange(1, 21), 2), 2)  # 2 templates x 20 positions x 2 variants
    source = np.repeat([0, 1], 40)
    two = SimpleNamespace(first_pos=pos, source=source)
    blocks = (pos - 1) // 4  # 5 blocks of 4 positions in each template
    assert positionwise(two, blocks) and contiguous_folds(two, blocks)
    assert not contiguous_folds(two, (pos - 1) % 5)  # modulo folds are scattered
    split_block = np.where((pos > 18) & (source == 1), 0, blocks)  # fold 0 also at template 1's end
    assert not contiguous_folds(two, split_block)
    one = SimpleNamespace(first_pos=pos[:40], source=None)
    assert contiguous_folds(one, blocks[:40]) and not contiguous_folds(one, ((pos - 1) % 5)[:40])


def test_a_position_wise_fold_column_validates_on_held_out_positions(tmp_path, pg_db, capsys):
    code, exp = train(tmp_path, pg_db, "modulo0", split={"strategy": "column", "column": "fold_modulo_5",
                                                           "n_folds": 5, "fold": 0})  # fmt: skip
    assert code == 0
    got = metrics(exp)
    assert {k: got["n"][k] for k in ("train", "val", "test")} == {"train": 410, "val": 76, "test": 114}
    train_pos, val_pos, test_pos = (positions(exp, name) for name in ("train", "val", "test"))
    assert not train_pos & val_pos and not train_pos & test_pos and not val_pos & test_pos
    assert all((p - 1) % 5 == 0 for p in test_pos)
    # a one-hot model has nothing at a position it never saw: constant predictions on val and test,
    # reported as undefined with that reason, never as a number
    assert got["undefined"] == {
        "val.spearman": "constant predictions",
        "val.pearson": "constant predictions",
        "test.spearman": "constant predictions",
        "test.pearson": "constant predictions",
    }
    assert got["test"]["spearman"] is None and got["val"]["spearman"] is None
    err = capsys.readouterr().err
    assert "undefined: spearman (constant predictions), pearson (constant predictions)" in err.splitlines()[-1]
    log = (exp / "logs/train.log").read_text()
    assert (
        "undefined: val.spearman (constant predictions), val.pearson (constant predictions), "
        "test.spearman (constant predictions), test.pearson (constant predictions)" in log
    )
    assert "variants at positions no training variant mutates: val 100%, test 100%" in log
    # the epoch's record and log line say undefined, never a number standing in for it
    (record,) = [json.loads(line) for line in (exp / "metrics/metrics.jsonl").read_text().splitlines()]
    assert record["val_spearman"] is None and record["val"]["spearman"] is None
    assert (
        f"epoch 1/1  train_loss {record['train_loss']:.4f}  val_loss {record['val_loss']:.4f}  val_spearman undefined"
        in log
    )
    assert events(exp, "warning") == []  # validation and test are the same problem
    assert events(exp, "done")[0]["undefined"] == got["undefined"]


def test_a_random_fold_column_keeps_random_validation(tmp_path, pg_db):
    code, exp = train(tmp_path, pg_db, "random0", split={"strategy": "column", "column": "fold_random_5",
                                                           "n_folds": 5, "fold": 0})  # fmt: skip
    assert code == 0
    assert positions(exp, "train") & positions(exp, "val")  # random rows share positions with training
    assert metrics(exp)["undefined"] == {}
    assert events(exp, "warning") == []


def test_built_in_position_splits_validate_on_held_out_positions(blat_db):
    variants = load_variants(DataSpec(db=str(blat_db), limit=800))
    pos = np.asarray(variants.first_pos)
    modulo = make_split(variants, SplitSpec(strategy="modulo", n_folds=5, fold=1))
    assert not set(pos[modulo["val"]]) & set(pos[modulo["train"]])
    assert len(modulo["val"]) >= round(0.1 * 800) and len(modulo["val"]) < round(0.1 * 800) + 20  # whole positions
    contiguous = make_split(variants, SplitSpec(strategy="contiguous", n_folds=5, fold=2))
    val_pos, train_pos = set(pos[contiguous["val"]]), set(pos[contiguous["train"]])
    assert not val_pos & train_pos
    # one run of consecutive positions among those not in the test block
    run = sorted(val_pos | train_pos)
    first, last = run.index(min(val_pos)), run.index(max(val_pos))
    assert set(run[first : last + 1]) == val_pos
    # seeded: the same split again
    again = make_split(variants, SplitSpec(strategy="contiguous", n_folds=5, fold=2))
    assert all(np.array_equal(contiguous[k], again[k]) for k in contiguous)


def test_validation_in_another_regime_than_the_test_is_warned_about_once(tmp_path):
    # a split column naming test rows by position (every fifth position) and no validation rows: the
    # validation share is carved at random from the training rows, a different problem
    rows = list(csv.DictReader(DEMO_CSV.open(newline="", encoding="utf-8")))[:600]
    for row in rows:
        row["split"] = "test" if (int(row["mutant"][1:-1]) - 1) % 5 == 0 else "train"
    with (tmp_path / "blat.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["mutant", "DMS_score", "DMS_score_bin", "split"])
        writer.writeheader()
        writer.writerows(rows)
    import_csv(tmp_path / "blat.csv", tmp_path / "blat.sqlite", "BLAT", DEMO_TEMPLATE, extra_columns=["split"])
    code, exp = train(tmp_path, tmp_path / "blat.sqlite", "labelled", split={"strategy": "column", "column": "split"})
    assert code == 0
    message = (
        "validation and test are different problems: 100% of test variants carry a position no training "
        "variant mutates, against 0% of validation variants; the kept model, ridge's alpha and early stopping "
        "follow validation, so they optimise the other regime (split positions as the test does: "
        "split.strategy modulo or contiguous, or a position-wise fold column)"
    )
    (warning,) = events(exp, "warning")
    assert {k: v for k, v in warning.items() if k not in ("ts", "experiment_id")} == {
        "event": "progress",
        "phase": "warning",
        "warning": "split_regime",
        "message": message,
        "unseen_positions": {"val": 0.0, "test": 1.0},
    }
    assert (exp / "logs/train.log").read_text().count(f"WARNING runner.core.experiment: {message}") == 1


def test_the_regime_rule():
    assert regime_warning({"val": 0.0, "test": REGIME_GAP - 0.01}) is None
    assert regime_warning({"val": 0.0, "test": REGIME_GAP}) is not None
    assert regime_warning({"val": 1.0, "test": 0.0}) is not None  # either way round
    assert regime_warning({"val": None, "test": 1.0}) is None  # no validation rows: nothing selects on them


def test_why_a_metric_is_undefined():
    assert undefined_reason([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]) == "constant predictions"
    assert undefined_reason([1.0, 1.0, 1.0], [0.1, 0.5, 0.2]) == "constant measured values"
    assert undefined_reason([1.0], [0.5]) == "a single row"
    assert undefined_reason([], []) == "no rows"


# --- data.sample ---------------------------------------------------------------------------------------


def test_sample_keys_are_splitmix64():
    # the published splitmix64 sequence from state 0 (Vigna's reference implementation): id 0 with seed 0
    # is its first output, id 0x9E3779B97F4A7C15 its second; unsigned 64-bit arithmetic, the same everywhere
    assert sample_keys(np.array([0]), 0).tolist() == [0xE220A8397B1DCDAF]
    assert sample_keys(np.array([0x9E3779B97F4A7C15]), 0).tolist() == [0x6E789E6AA1B965F4]


def test_sample_draws_from_the_whole_selection_where_limit_takes_the_first_ids(blat_db):
    limited = load_variants(DataSpec(db=str(blat_db), limit=3000))
    sampled = load_variants(DataSpec(db=str(blat_db), sample=3000))
    spans = {
        name: (int(v.first_pos.min()), int(v.first_pos.max()), len(np.unique(v.first_pos)))
        for name, v in (("limit", limited), ("sample", sampled))
    }
    assert spans == {"limit": (24, 181, 158), "sample": (24, 286, 263)}  # all 263 positions of the 4,997
    assert len(sampled) == 3000 and np.all(np.diff(sampled.ids) > 0)  # still in id order
    assert sampled.query["sample"] == {"n": 3000, "seed": 0, "from": 4997}
    again = load_variants(DataSpec(db=str(blat_db), sample=3000))
    smaller = load_variants(DataSpec(db=str(blat_db), sample=1000))
    other = load_variants(DataSpec(db=str(blat_db), sample=3000, sample_seed=1))
    assert np.array_equal(again.ids, sampled.ids)
    assert set(smaller.ids) <= set(sampled.ids)  # a smaller sample is part of a larger one
    assert len(set(other.ids) & set(sampled.ids)) == 1783  # another seed, another sample (by chance: 1,801)
    everything = load_variants(DataSpec(db=str(blat_db), sample=10_000))
    assert len(everything) == 4997


def test_sample_is_recorded_and_applied_before_the_split(tmp_path, blat_db):
    code, exp = train(tmp_path, blat_db, "sampled", data={"db": str(blat_db), "sample": 400})
    assert code == 0
    assert json.loads((exp / "config/query.json").read_text())["sample"] == {"n": 400, "seed": 0, "from": 4997}
    assert sum(metrics(exp)["n"][k] for k in ("train", "val", "test")) == 400


@pytest.mark.parametrize(
    "data,message",
    [
        (
            {"limit": 100, "sample": 50},
            "data.sample: give data.sample or data.limit, not both: sample draws rows at random from the whole "
            "selection, limit takes the first ids",
        ),
        ({"sample": 0}, "data.sample: must be > 0"),
        ({"sample": 2.5}, "data.sample: must be an integer"),
        ({"sample": 10, "sample_seed": -1}, "data.sample_seed: must be >= 0"),
    ],
)
def test_sample_is_validated_by_the_plan(blat_db, data, message):
    doc = {"name": "x", "data": {"db": str(blat_db), **data}, "model": {"name": "ridge"}}
    with pytest.raises(PlanError) as err:
        load_plan("plan.json", text=json.dumps(doc))
    assert [str(issue) for issue in err.value.issues] == [message]
