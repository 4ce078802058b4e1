"""The data contract (issue 15): the lab's own database layout read as it is, validation that agrees
with what the core needs, a ProteinGym folder to a column-split plan, and only finite numbers."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from runner.errors import DataError, PlanError
from runner.plan.load import load_plan
from runner.plan.models import Plan
from tests.conftest import BLAT_HEAD, LAB_DDL, make_db

REPO = Path(__file__).resolve().parents[1]

# The lab's DDL, byte for byte as the original design note gives it.
LAB_DDL_TEXT = """    sources(id, source_text, template)
    mutations(id, mutant, DMS_score, DMS_score_bin, mut_num, source REFERENCES sources(id))"""
LAB_ROWS = [  # id, mutant, DMS_score, DMS_score_bin, mut_num, source, condition (an extra column)
    (10, "H24A", -0.01, 1, None, 1, "amp"),
    (11, "H24C", -0.42, None, None, 1, "amp"),
    (12, "P25A", -2.1, 0, 1, 1, "cef"),
    (13, "E26K", 0.05, 1, None, 1, "amp"),
    (14, "H24A:P25G", -1.8, 0, None, 1, "amp"),
    (15, "", 0.0, 1, 0, 1, "amp"),
    (20, "A1C", 0.3, None, None, 2, "amp"),
    (21, "C2D:D3E", 0.1, 1, None, 2, "cef"),
]


def lab_db(path: Path, rows=LAB_ROWS) -> Path:
    """A database made the way the lab's script makes it: the note's DDL, explicit ids, NULLs."""
    conn = sqlite3.connect(path)
    for line in LAB_DDL_TEXT.splitlines():
        conn.execute(f"CREATE TABLE {line.strip()}")
    conn.execute("ALTER TABLE mutations ADD COLUMN condition")
    conn.executemany("INSERT INTO sources VALUES (?, ?, ?)", [(1, "BLAT_mini", BLAT_HEAD), (2, "tiny", "ACDEFGHIK")])
    conn.executemany("INSERT INTO mutations VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    conn.commit()
    conn.close()
    return path


def plan_doc(db: Path, **extra) -> dict:
    doc = {"name": "lab", "data": {"db": str(db)}, "model": {"name": "linear"}}
    for key, value in extra.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    return doc


def issues(doc: dict) -> list[str]:
    with pytest.raises(PlanError) as info:
        load_plan("plan.json", text=json.dumps(doc))
    return [str(i) for i in info.value.issues]


def test_the_ddl_is_the_design_notes():
    assert [line.strip() for line in LAB_DDL_TEXT.splitlines()] == [
        "sources(id, source_text, template)",
        "mutations(id, mutant, DMS_score, DMS_score_bin, mut_num, source REFERENCES sources(id))",
    ]
    assert LAB_DDL.splitlines() == [f"CREATE TABLE {line.strip()};" for line in LAB_DDL_TEXT.splitlines()]


@pytest.mark.core
def test_lab_database_validates_and_loads(tmp_path):
    from runner.core.data import load_variants

    db = lab_db(tmp_path / "lab.sqlite")
    plan = load_plan("plan.json", text=json.dumps(plan_doc(db))).plan
    vs = load_variants(plan.data, plan.vocab)
    assert vs.ids.tolist() == [10, 11, 12, 13, 14, 15, 20, 21]
    assert vs.mut_num.tolist() == [1, 1, 1, 1, 2, 0, 1, 2]  # derived from the mutant, NULL or not
    assert vs.source_names == ["BLAT_mini", "tiny"]
    assert vs.frame["DMS_score_bin"].isna().tolist() == [False, True, False, False, False, False, True, False]
    assert vs.frame["condition"].tolist() == ["amp", "amp", "cef", "amp", "amp", "amp", "amp", "cef"]
    assert vs.frame["sequence"].iloc[7] == "AD" + "E" + "EFGHIK"
    assert 'm."source" AS source_ref' in vs.query["sql"]


@pytest.mark.core
def test_lab_database_where_on_null_mut_num_and_extra_columns(tmp_path):
    from runner.core.data import load_variants

    db = lab_db(tmp_path / "lab.sqlite")
    where = [
        {"column": "mut_num", "op": "=", "value": 1},  # stored NULL for most rows: derived from the mutant
        {"column": "condition", "op": "=", "value": "amp"},
        {"column": "source_text", "op": "=", "value": "BLAT_mini"},
    ]
    plan = load_plan("plan.json", text=json.dumps(plan_doc(db, data={"where": where}))).plan
    vs = load_variants(plan.data, plan.vocab)
    assert vs.ids.tolist() == [10, 11, 13]


@pytest.mark.core
def test_lab_database_column_split_and_classification(tmp_path):
    from runner.core.data import load_variants

    db = lab_db(tmp_path / "lab.sqlite")
    plan = load_plan(
        "plan.json",
        text=json.dumps(
            plan_doc(db, data={"target": "DMS_score_bin"}, split={"strategy": "column", "column": "condition"})
        ),
    ).plan
    vs = load_variants(plan.data, plan.vocab)
    assert vs.ids.tolist() == [10, 12, 13, 14, 15, 21]  # NULL bins are unknown: left out, counted
    assert vs.dropped == {"nan_target": 2}


@pytest.mark.core
def test_infra_01_database_keeps_working(tmp_path):
    from runner.core.data import load_variants

    db = make_db(tmp_path / "old.sqlite", layout="infra-0.1")
    where = [{"column": "description", "op": "=", "value": ""}, {"column": "mut_num", "op": "<=", "value": 1}]
    plan = load_plan("plan.json", text=json.dumps(plan_doc(db, data={"where": where}))).plan
    vs = load_variants(plan.data, plan.vocab)
    assert vs.ids.tolist() == [1, 2, 3, 4, 6] and 'm."source_id" AS source_ref' in vs.query["sql"]


@pytest.mark.parametrize(
    ("ddl", "message"),
    [
        (
            "CREATE TABLE sources(id, source_text, template);"
            "CREATE TABLE mutations(id, mutant, DMS_score, DMS_score_bin, mut_num)",
            "lacks column(s) mutations.source (the reference to sources.id); expected the layout "
            "sources(id, source_text, template), mutations(id, mutant, DMS_score, DMS_score_bin, mut_num, "
            "source REFERENCES sources(id))",
        ),
        (
            "CREATE TABLE sources(id, source_text);"
            "CREATE TABLE mutations(id, mutant, score, source REFERENCES sources(id))",
            "lacks column(s) sources.template, mutations.DMS_score; expected the layout",
        ),
        ("CREATE TABLE sources(id, source_text, template)", "has no 'mutations' table"),
    ],
)
@pytest.mark.core
def test_a_database_the_core_cannot_use_fails_validation_naming_the_piece(tmp_path, ddl, message):
    from runner.core.data import load_variants

    db = tmp_path / "broken.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript(ddl)
    conn.close()
    found = issues(plan_doc(db))
    assert len(found) == 1 and found[0].startswith(f"data.db: {db} ") and message in found[0], found
    with pytest.raises(DataError) as info:  # and the core says the same
        load_variants(Plan.model_validate(plan_doc(db)).data)
    assert message in str(info.value)


@pytest.mark.core
def test_validation_checks_what_the_core_reads(tmp_path):
    from runner.core.data import load_variants

    db = lab_db(tmp_path / "lab.sqlite")
    found = issues(
        plan_doc(
            db,
            data={"where": [{"column": "conditon", "op": "=", "value": "amp"}], "dataset": "BLAT"},
            split={"strategy": "column", "column": "source_text"},
        )
    )
    assert found == [
        "data.where[0].column: no column 'conditon' in lab.sqlite; did you mean 'condition'?",
        "data.dataset: no dataset 'BLAT' in lab.sqlite; did you mean 'BLAT_mini'?",
        "split.column: no column 'source_text' in the mutations table of lab.sqlite; did you mean 'source'?",
    ]
    no_bin = tmp_path / "nobin.sqlite"
    conn = sqlite3.connect(no_bin)
    conn.executescript(
        "CREATE TABLE sources(id, source_text, template);"
        "CREATE TABLE mutations(id, mutant, DMS_score, source REFERENCES sources(id));"
        f"INSERT INTO sources VALUES (1, 'a', '{BLAT_HEAD}'); INSERT INTO mutations VALUES (1, 'H24A', 1.0, 1);"
    )
    conn.close()
    assert issues(plan_doc(no_bin, data={"target": "DMS_score_bin"})) == [
        "data.target: nobin.sqlite has no DMS_score_bin column; use DMS_score"
    ]
    assert len(load_variants(load_plan("p", text=json.dumps(plan_doc(no_bin))).plan.data)) == 1


def test_validation_scans_an_untyped_database_for_what_would_fail_at_start(tmp_path):
    rows = [*LAB_ROWS[:4], (11, "E26K", "high", 1, 1, 1, "amp"), (30, "H24C", 0.1, 1, 1, 9, "amp")]
    db = lab_db(tmp_path / "lab.sqlite", rows=rows)
    assert issues(plan_doc(db)) == [
        "data.db: lab.sqlite: mutations.id 11 is used by more than one row",
        "data.db: lab.sqlite: 1 value(s) of mutations.DMS_score are not numbers (text or blobs)",
        "data.db: lab.sqlite: 1 mutations row(s) refer to no row of sources (mutations.source)",
    ]


def test_cli_validate_on_a_lab_database(tmp_path):
    db = lab_db(tmp_path / "lab.sqlite")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(plan_doc(db)))
    result = subprocess.run(
        [sys.executable, "-m", "runner", "validate", str(plan)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr


# --- ProteinGym folder -> import-proteingym -> a plan with split.strategy "column" -------------------


@pytest.mark.core
def test_proteingym_folder_to_a_column_split_run(tmp_path):
    from runner.core.cli import main
    from runner.data.proteingym import import_proteingym
    from tests.conftest import make_proteingym_folder

    folder = make_proteingym_folder(tmp_path / "pg")
    db = tmp_path / "pg.sqlite"
    assert import_proteingym(folder, db, ["BLAT_ECOLX_Stiffler_2015"]).count("imported") == 1
    doc = plan_doc(
        db,
        name="pg-fold0",
        data={"dataset": "BLAT_ECOLX_Stiffler_2015"},
        split={"strategy": "column", "column": "fold_random_5", "n_folds": 5, "fold": 0},
        train={"max_epochs": 2, "batch_size": 64},
    )
    loaded = load_plan("plan.json", text=json.dumps(doc))
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(loaded.resolved))
    assert main([str(plan_path), "--exp-dir", str(tmp_path / "exp")]) == 0
    metrics = json.loads((tmp_path / "exp" / "metrics" / "metrics.json").read_text())
    conn = sqlite3.connect(db)
    fold0 = conn.execute("SELECT count(*) FROM mutations WHERE fold_random_5 = 0").fetchone()[0]
    conn.close()
    assert metrics["n"]["test"] == fold0 and metrics["n"]["train"] + metrics["n"]["val"] == 600 - fold0
    assert isinstance(metrics["test"]["spearman"], float)


# --- only finite numbers ---------------------------------------------------------------------------


@pytest.mark.core
def test_infinite_scores_in_the_database_are_dropped_and_counted(tmp_path):
    import numpy as np

    from runner.core.data import load_variants

    rows = [*LAB_ROWS[:6]]
    rows[1] = (11, "H24C", 1e999, 1, None, 1, "amp")  # SQLite stores 1e999 as +Inf
    rows[2] = (12, "P25A", float("-inf"), 0, 1, 1, "cef")
    db = lab_db(tmp_path / "lab.sqlite", rows=rows)
    vs = load_variants(Plan.model_validate(plan_doc(db)).data)
    assert vs.ids.tolist() == [10, 13, 14, 15] and vs.dropped == {"non_finite_target": 2}
    assert np.isfinite(vs.target).all()
    vs = load_variants(Plan.model_validate(plan_doc(db, data={"drop_nan": False})).data)
    assert vs.dropped == {"non_finite_target": 2}  # infinite scores go even when NaN targets are kept


@pytest.mark.core
def test_a_diverging_training_ends_failed_with_one_line(tmp_path, capsys):
    from runner.core.cli import main
    from runner.data.importer import build_demo_db

    db = build_demo_db(tmp_path / "blat.sqlite").db
    doc = plan_doc(
        Path(db),
        data={"limit": 800},
        train={"max_epochs": 3, "batch_size": 128, "lr": 10, "optimizer": "sgd"},
    )
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(doc))
    exp = tmp_path / "exp"
    assert main([str(plan), "--exp-dir", str(exp)]) == 1
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("infra-train: error:"))
    assert line.startswith("infra-train: error: training diverged at epoch 0: ")
    assert line.endswith("; lower train.lr, set train.gradient_clip_val, or check the model and the targets")
    assert "TrainingDiverged" not in err  # one line, no traceback of the exception
    record = json.loads((exp / "metrics" / "metrics.jsonl").read_text().splitlines()[0])  # strict JSON
    assert record["train_loss"] is None and "train_loss" in record["non_finite"]
    assert not (exp / "metrics" / "metrics.json").exists()
    assert "training diverged" in (exp / "logs" / "train.log").read_text()


@pytest.mark.core
def test_nan_targets_kept_on_purpose_fail_the_run_instead_of_succeeding(tmp_path, capsys):
    from runner.core.cli import main

    rows = [
        (i, f"{BLAT_HEAD[p - 1]}{p}A", float(p % 7) if p % 5 else None, 1, 1, 1, "amp")
        for i, p in enumerate(range(2, 60), start=1)
        if BLAT_HEAD[p - 1] != "A"
    ]
    db = lab_db(tmp_path / "lab.sqlite", rows=rows)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(plan_doc(db, data={"drop_nan": False}, train={"max_epochs": 1})))
    assert main([str(plan), "--exp-dir", str(tmp_path / "exp")]) == 1
    assert "infra-train: error: training diverged at epoch 0: " in capsys.readouterr().err


@pytest.mark.core
def test_the_core_refuses_what_validation_refuses(tmp_path):
    from runner.core.cli import main

    db = lab_db(tmp_path / "lab.sqlite")
    plan = tmp_path / "plan.json"
    text = json.dumps(plan_doc(db, train={"weight_decay": 1.0})).replace("1.0", "Infinity")
    plan.write_text(text)  # Python's json writes and reads Infinity; it is not JSON
    assert main([str(plan), "--exp-dir", str(tmp_path / "exp")]) == 2
