"""The lab's own database in a container run (issue 15): a file made with the design note's DDL →
`infra run` → metrics; and a diverging training in the container ends `failed` with one clear line."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sqlite3
from pathlib import Path

import pytest

from runner.data.importer import DEMO_CSV, DEMO_SOURCE, DEMO_TEMPLATE
from tests.e2e import infra_as

pytestmark = [pytest.mark.docker, pytest.mark.slow]

# byte for byte as the original design note gives the layout
LAB_DDL_TEXT = """    sources(id, source_text, template)
    mutations(id, mutant, DMS_score, DMS_score_bin, mut_num, source REFERENCES sources(id))"""


def make_lab_db(path: Path) -> Path:
    """What the lab's external script writes: the note's DDL, explicit ids, mut_num left NULL, every
    tenth bin unknown, and an extra condition column."""
    conn = sqlite3.connect(path)
    for line in LAB_DDL_TEXT.splitlines():
        conn.execute(f"CREATE TABLE {line.strip()}")
    conn.execute("ALTER TABLE mutations ADD COLUMN condition")
    conn.execute("INSERT INTO sources VALUES (7, ?, ?)", (DEMO_SOURCE, DEMO_TEMPLATE))
    with DEMO_CSV.open(newline="") as fh:
        rows = [
            (
                1000 + i,
                r["mutant"],
                float(r["DMS_score"]),
                None if i % 10 == 0 else int(r["DMS_score_bin"]),
                None,
                7,
                "amp2500",
            )
            for i, r in enumerate(csv.DictReader(fh))
        ]
    conn.executemany("INSERT INTO mutations VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    conn.commit()
    conn.close()
    return path


def test_lab_ddl_database_runs_in_a_container(base_image, workdir, run_user):
    uid, gid, _ = run_user
    db = make_lab_db(workdir / "data" / "lab.sqlite")
    plan = {
        "name": "lab-ddl",
        "data": {"db": "../data/lab.sqlite", "where": [{"column": "condition", "op": "=", "value": "amp2500"}]},
        "model": {"name": "linear"},
        "train": {"max_epochs": 8, "batch_size": 256},
        "metrics": ["spearman", "pearson", "mse"],
    }
    (workdir / "plans" / "lab.json").write_text(json.dumps(plan))
    for path in (db, workdir / "plans" / "lab.json"):
        os.chown(path, uid, gid)
    before = hashlib.sha256(db.read_bytes()).hexdigest()

    validate = infra_as(run_user, "validate", "plans/lab.json", workdir=workdir)
    assert validate.returncode == 0, validate.stderr
    result = infra_as(run_user, "run", "plans/lab.json", "--json", workdir=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    assert doc["state"] == "succeeded"
    exp_dir = Path(doc["exp_dir"])
    metrics = json.loads((exp_dir / "metrics" / "metrics.json").read_text())
    assert metrics["n"]["selected"] == 4997 and metrics["test"]["spearman"] > 0.5
    query = json.loads((exp_dir / "config" / "query.json").read_text())
    assert 'm."source" AS source_ref' in query["sql"] and query["params"] == ["amp2500"]
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    print("lab-ddl test metrics:", json.dumps(metrics["test"]))

    # the same database, a learning rate that makes the linear model diverge: failed, one clear line.
    # From zero, not the ridge start: the fit on all 4,997 variants cost more than the rest of the run,
    # and the first epoch diverges either way
    diverge = infra_as(
        run_user,
        "run",
        "plans/lab.json",
        "--json",
        "--set",
        "train.lr=10",
        "--set",
        "train.optimizer=sgd",
        "--set",
        "model.params.init=zero",
        workdir=workdir,
    )
    assert diverge.returncode == 1, diverge.stderr[-2000:]
    failed = json.loads(diverge.stdout)
    assert failed["state"] == "failed" and failed["exit_code"] == 1
    error = failed["error"]
    assert error["type"] == "ExperimentFailed" and error["exit_code"] == 1
    assert error["reason"].startswith("training diverged at epoch 0: ") and "lower train.lr" in error["reason"]
    log = (Path(failed["exp_dir"]) / "container.log").read_text()
    assert "infra-train: error: training diverged at epoch 0: " in log and "Traceback" not in log
