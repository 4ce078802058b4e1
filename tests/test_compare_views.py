"""Studies that read clearly: ids by unique prefix (and study ids), `infra ls`'s columns, `infra status`
and `infra stop` of a study, `infra compare`'s table, groups, CSV and plot, shell completion of ids.

The experiments are made by hand (a record through `new_record` + `Experiment.write`, config/plan.json
and metrics/metrics.json as the training writes them, a study record as `runner.run.study` writes it),
so every number is known and the outputs are compared whole. tests/test_compare.py runs a real study.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import pytest

from runner.run.records import Experiment, kept_of, new_record, plan_sha256, resolve_id, undefined_of
from tests.helpers import REPO, infra

STATUS_SCHEMA = json.loads((REPO / "schemas" / "status.schema.json").read_text())
STUDY = "blat-study-1234abcd56"
METRIC_NAMES = ("spearman", "pearson", "mse", "ndcg")


def plan_of(eid: str, model_name: str, seed: int, db: Path, **extra) -> dict:
    """A resolved plan as config/plan.json holds it (the host's database path since this round)."""
    plan = {
        "name": "blat",
        "experiment_id": eid,
        "data": {"db": str(db), "dataset": "BLAT_ECOLX_Stiffler_2015", "target": "DMS_score", "where": []},
        "model": {"name": model_name, "params": {}},
        "embeddings": {"name": "onehot", "params": {}},
        "split": {"strategy": "random", "seed": 0, "fold": 0},
        "train": {"seed": seed, "lr": 0.001, "max_epochs": 8},
        "metrics": ["spearman", "pearson", "mse", "ndcg"],
        "resources": {"gpus": "none"},
        "tracking": None,
    }
    for key, value in extra.items():
        section, _, leaf = key.partition("__")
        if leaf:
            plan[section][leaf] = value
        else:
            plan[section] = value
    return plan


def metrics_doc(test: dict, val: dict, kept: dict | None, undefined: dict | None = None) -> dict:
    doc = {"test": test, "val": val, "n": {"train": 210, "val": 30, "test": 60, "selected": 300}, "epochs": 8}
    doc["training_seconds"] = 12.5
    if kept is not None:
        doc["kept"] = kept
    if undefined is not None:
        doc["undefined"] = undefined
    return doc


def scores(spearman, val_spearman, pearson=0.74, mse=0.5, ndcg=0.9) -> tuple[dict, dict]:
    test = {"spearman": spearman, "pearson": pearson, "mse": mse, "ndcg": ndcg}
    val = {"spearman": val_spearman, "pearson": pearson - 0.01, "mse": mse + 0.01, "ndcg": ndcg - 0.01}
    return test, val


def make_experiment(
    work: Path,
    eid: str,
    plan: dict,
    metrics: dict | None,
    state: str = "succeeded",
    minute: int = 0,
    seconds: int = 65,
    **record_fields,
) -> Experiment:
    exp = Experiment(work / "experiments" / eid)
    exp.make_layout()
    record = new_record(exp, name="blat", backend="local", plan_sha=plan_sha256(plan), attempt=1, previous=None)
    begin = datetime(2026, 12, 1, 10, minute, tzinfo=UTC)
    start, finish = (
        t.isoformat(timespec="milliseconds").replace("+00:00", "Z") for t in (begin, begin + timedelta(seconds=seconds))
    )
    record.update(state=state, created_at=start, started_at=start, db=plan["data"]["db"], **record_fields)
    record.update(finished_at=finish if state not in ("running", "created", "starting") else None)
    exp.write(record)
    (exp.root / "config" / "plan.json").write_text(json.dumps(plan))
    if metrics is not None:
        (exp.root / "metrics" / "metrics.json").write_text(json.dumps(metrics))
    return exp


def write_study(work: Path, sid: str, points: list[tuple[dict, str]], keys: list[str]) -> None:
    (work / "studies").mkdir(exist_ok=True)
    doc = {
        "study_id": sid,
        "name": "blat",
        "source": "plans/blat.json",
        "keys": keys,
        "created_at": "2026-12-01T09:59:59.000Z",
        "backend": "local",
        "slots": 1,
        "points": [{"index": i, "values": v, "experiment_id": e} for i, (v, e) in enumerate(points, 1)],
    }
    (work / "studies" / f"{sid}.json").write_text(json.dumps(doc, indent=2))


CLOSED_FORM = {"model": "closed_form", "epoch": None, "by": "val_spearman", "value": 0.721, "best_trained": None,
               "why": "a closed-form model: no epochs to choose from", "warning": None}  # fmt: skip
EPOCH_2 = {"model": "epoch", "epoch": 2, "by": "val_spearman", "value": 0.73,
           "best_trained": {"epoch": 2, "value": 0.73, "start_z": 3.1}, "why": "epoch 3 beat the start clearly",
           "warning": None}  # fmt: skip
START = {"model": "start", "epoch": None, "by": "val_spearman", "value": 0.71,
         "best_trained": {"epoch": 4, "value": 0.712, "start_z": 0.4},
         "why": "no epoch was clearly above the fitted start", "warning": "seeds 0 and 1 kept the same start"}  # fmt: skip


@pytest.fixture
def study(tmp_path) -> Path:
    """A workdir with the study model ∈ {ridge, cnn} × train.seed ∈ {0, 1, 2}: ridge seed 2 not run yet,
    cnn seed 2 failed, cnn seed 1's test Spearman undefined; noise that must not become columns
    (tracking, resources, the metrics list, model.params {} against null)."""
    work = tmp_path / "work"
    db = work / "data" / "pg.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"")
    ridge0 = plan_of("blat-0a1b2c3d4e", "ridge", 0, db)
    ridge1 = plan_of("blat-0a9f8e7d6c", "ridge", 1, db, model={"name": "ridge", "params": None})
    cnn0 = plan_of("blat-5c0ffee000", "cnn", 0, db, tracking={"mlflow_uri": "http://mlflow:5000"})
    cnn1 = plan_of("blat-5cab000001", "cnn", 1, db, resources={"gpus": "all"}, metrics=["spearman"])
    cnn2 = plan_of("blat-9dead00002", "cnn", 2, db)
    make_experiment(work, "blat-0a1b2c3d4e", ridge0, metrics_doc(*scores(0.7312, 0.7210), CLOSED_FORM), minute=0)
    make_experiment(work, "blat-0a9f8e7d6c", ridge1, metrics_doc(*scores(0.7312, 0.7210), CLOSED_FORM), minute=2)
    make_experiment(
        work, "blat-5c0ffee000", cnn0, metrics_doc(*scores(0.7251, 0.7300, 0.70), EPOCH_2), minute=4, seconds=754
    )
    undefined = {"test.spearman": "constant predictions"}
    make_experiment(
        work,
        "blat-5cab000001",
        cnn1,
        metrics_doc(*scores(None, 0.7100, 0.0), START, undefined),
        minute=20,
        seconds=3725,
    )
    make_experiment(work, "blat-9dead00002", cnn2, None, state="failed", minute=30, seconds=5, exit_code=1)
    points = [
        ({"model": {"name": m}, "train.seed": s}, e)
        for (m, s), e in zip(
            [("ridge", 0), ("ridge", 1), ("ridge", 2), ("cnn", 0), ("cnn", 1), ("cnn", 2)],
            [
                "blat-0a1b2c3d4e",
                "blat-0a9f8e7d6c",
                "blat-7e57000003",
                "blat-5c0ffee000",
                "blat-5cab000001",
                "blat-9dead00002",
            ],  # fmt: skip
            strict=True,
        )
    ]
    write_study(work, STUDY, points, ["model", "train.seed"])
    return work


def run(work: Path, *args: str) -> subprocess.CompletedProcess:
    return infra(*args, workdir=work)


# --- ids by unique prefix -----------------------------------------------------------------------------


def test_a_unique_prefix_names_the_experiment_everywhere(study):
    status = run(study, "status", "blat-5c0", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["experiment_id"] == "blat-5c0ffee000"
    assert run(study, "logs", "blat-9de").returncode == 0
    removed = run(study, "rm", "blat-9de", "--dry-run", "--json")
    assert removed.returncode == 0, removed.stderr
    assert [e["experiment_id"] for e in json.loads(removed.stdout)["experiments"]] == ["blat-9dead00002"]
    compared = run(study, "compare", "blat-0a1", "blat-5c0", "--json")
    assert [r["experiment_id"] for r in json.loads(compared.stdout)["experiments"]] == [
        "blat-0a1b2c3d4e",
        "blat-5c0ffee000",
    ]
    stopped = run(study, "stop", "blat-0a9")  # already ended: only reports its state
    assert (stopped.returncode, stopped.stderr) == (0, "experiment blat-0a9f8e7d6c succeeded\n")
    predicted = run(study, "predict", "blat-9de", "--saturation")  # resolved first, then refused: it failed
    assert predicted.returncode == 1 and "experiment blat-9dead00002 is failed, not succeeded" in predicted.stderr


def test_an_ambiguous_prefix_is_one_line_naming_the_candidates(study):
    result = run(study, "status", "blat-0a")
    assert result.returncode == 2
    assert result.stderr == (
        "infra: error: id prefix 'blat-0a' is ambiguous: 2 experiments start with it: blat-0a1b2c3d4e, "
        "blat-0a9f8e7d6c; type more of the id\n"
    )
    many = run(study, "stop", "blat")
    assert many.returncode == 2
    assert many.stderr == (
        "infra: error: id prefix 'blat' is ambiguous: 6 experiments and studies start with it: blat-0a1b2c3d4e, "
        "blat-0a9f8e7d6c, blat-5c0ffee000, blat-5cab000001 and 2 more; type more of the id\n"
    )
    for args in (["logs", "blat-5c"], ["rm", "blat-5c"], ["compare", "blat-5c"], ["predict", "blat-5c"]):
        other = run(study, *args)
        assert other.returncode == 2 and "2 experiments start with it" in other.stderr, args
    as_json = run(study, "status", "blat-0a", "--json")
    assert json.loads(as_json.stdout)["error"]["exit_code"] == 2


def test_an_unknown_id_or_prefix_stays_exit_4(study):
    result = run(study, "logs", "nope")
    assert result.returncode == 4
    assert (
        result.stderr == f"infra: error: no experiment 'nope' in {study / 'experiments'}; list them with 'infra ls'\n"
    )
    either = run(study, "status", "blat-x")
    assert either.returncode == 4
    assert either.stderr == (
        f"infra: error: no experiment 'blat-x' in {study / 'experiments'}; list them with 'infra ls' "
        "(studies: 'infra ls --studies')\n"
    )
    no_study = run(study, "compare", "--study", "nope")
    assert no_study.returncode == 4
    assert (
        no_study.stderr
        == f"infra: error: no study 'nope' in {study / 'studies'}; list them with 'infra ls --studies'\n"
    )
    assert run(study, "status", "../etc").returncode == 4


def test_whole_ids_win_over_longer_ones(tmp_path):
    work = tmp_path / "work"
    db = tmp_path / "x.db"
    for eid in ("blat-1", "blat-10"):
        make_experiment(work, eid, plan_of(eid, "ridge", 0, db), None)
    assert resolve_id(work, "blat-1") == ("experiment", "blat-1")
    assert resolve_id(work, "blat-10") == ("experiment", "blat-10")


# --- shell completion -----------------------------------------------------------------------------------


def test_completion_offers_ids_of_the_workdir_by_prefix(study, monkeypatch):
    from runner.cli.experiments import complete_any_ids, complete_experiment_ids, complete_study_ids

    monkeypatch.setenv("INFRA_WORKDIR", str(study))
    assert complete_experiment_ids(None, "blat-5") == ["blat-5c0ffee000", "blat-5cab000001"]
    assert complete_study_ids(None, "") == [(STUDY, "study")]
    assert complete_any_ids(None, "blat-s") == [(STUDY, "study")]
    monkeypatch.setenv("INFRA_WORKDIR", str(study / "missing"))
    assert complete_any_ids(None, "") == []  # never fails loudly
    monkeypatch.delenv("INFRA_WORKDIR")
    assert complete_any_ids(None, "b") == []


def test_completion_through_the_shell_protocol(study):
    env = {"_INFRA_COMPLETE": "complete_bash", "COMP_WORDS": "infra status blat-0", "COMP_CWORD": "2"}
    result = infra(workdir=study, env=env)
    assert result.returncode == 0 and result.stdout.split() == ["blat-0a1b2c3d4e", "blat-0a9f8e7d6c"]
    env = {"_INFRA_COMPLETE": "complete_bash", "COMP_WORDS": "infra compare --study b", "COMP_CWORD": "3"}
    assert infra(workdir=study, env=env).stdout.split() == [STUDY]


# --- infra ls -------------------------------------------------------------------------------------------


LS = """\
EXPERIMENT       STATE      MODEL  DATA        KEPT         TEST SPEARMAN  DURATION  CREATED
blat-9dead00002  failed     cnn    BLAT_ECOLX  -            -              5s        2026-12-01 10:30
blat-5cab000001  succeeded  cnn    BLAT_ECOLX  start        undef          1h02m     2026-12-01 10:20
blat-5c0ffee000  succeeded  cnn    BLAT_ECOLX  epoch 3      0.7251         12m34s    2026-12-01 10:04
blat-0a9f8e7d6c  succeeded  ridge  BLAT_ECOLX  closed form  0.7312         1m05s     2026-12-01 10:02
blat-0a1b2c3d4e  succeeded  ridge  BLAT_ECOLX  closed form  0.7312         1m05s     2026-12-01 10:00
"""


def test_ls_shows_model_data_kept_spearman_and_duration(study):
    result = run(study, "ls")
    assert result.returncode == 0, result.stderr
    assert result.stdout == LS
    assert max(len(line) for line in result.stdout.splitlines()) <= 120


def test_ls_json_carries_the_same_fields(study):
    docs = {d["experiment_id"]: d for d in json.loads(run(study, "ls", "--json").stdout)["experiments"]}
    for doc in docs.values():
        jsonschema.validate(doc, STATUS_SCHEMA)
    cnn1 = docs["blat-5cab000001"]
    assert (cnn1["model"], cnn1["dataset"], cnn1["test_spearman"]) == ("cnn", "BLAT_ECOLX_Stiffler_2015", None)
    assert cnn1["undefined"] == {"test.spearman": "constant predictions"}
    assert cnn1["kept"] == START and cnn1["duration_s"] == 3725.0
    assert (
        docs["blat-0a1b2c3d4e"]["kept"]["model"] == "closed_form" and docs["blat-0a1b2c3d4e"]["test_spearman"] == 0.7312
    )
    assert docs["blat-9dead00002"]["kept"] is None and docs["blat-9dead00002"]["undefined"] == {}


def test_ls_of_one_study_and_the_list_of_studies(study):
    # an experiment of no study, recorded running by a process long gone: `ls` would reconcile it
    other = make_experiment(study, "blat-0ther00001", plan_of("blat-0ther00001", "ridge", 9, study / "data" / "pg.db"),
                            None, state="running", minute=40)  # fmt: skip
    result = run(study, "ls", "--study", "blat-st")
    assert result.returncode == 0, result.stderr
    ids = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert ids == ["blat-0a1b2c3d4e", "blat-0a9f8e7d6c", "blat-5c0ffee000", "blat-5cab000001", "blat-9dead00002"]
    assert other.read()["state"] == "running"  # one study's listing reads and reconciles only its points
    assert "blat-0ther00001  lost" in run(study, "ls").stdout and other.read()["state"] == "lost"
    studies = run(study, "ls", "--studies")
    assert studies.stdout == (
        "STUDY                  NAME  POINTS  STATES                            CREATED\n"
        "blat-study-1234abcd56  blat  6       4 succeeded, 1 not run, 1 failed  2026-12-01 09:59\n"
    )


# --- status and stop of a study -----------------------------------------------------------------------


STUDY_STATUS = """\
study          blat-study-1234abcd56
name           blat
source         plans/blat.json
keys           model, train.seed
created_at     2026-12-01T09:59:59.000Z
points         6: 4 succeeded, 1 not run, 1 failed

#  experiment       state      test.spearman  kept         duration  model.name  train.seed
1  blat-0a1b2c3d4e  succeeded  0.7312         closed form  1m05s     ridge       0
2  blat-0a9f8e7d6c  succeeded  0.7312         closed form  1m05s     ridge       1
3  blat-7e57000003  not run    -              -            -         ridge       2
4  blat-5c0ffee000  succeeded  0.7251         epoch 3      12m34s    cnn         0
5  blat-5cab000001  succeeded  undef          start        1h02m     cnn         1
6  blat-9dead00002  failed     -              -            5s        cnn         2
"""


def test_status_of_a_study_shows_its_points(study):
    result = run(study, "status", "blat-study")
    assert result.returncode == 0, result.stderr
    assert result.stdout == STUDY_STATUS
    doc = json.loads(run(study, "status", STUDY, "--json").stdout)
    assert doc["states"] == {"succeeded": 4, "not run": 1, "failed": 1}
    point = doc["points"][4]
    assert point == {
        "index": 5,
        "values": {"model": {"name": "cnn"}, "train.seed": 1},
        "experiment_id": "blat-5cab000001",
        "state": "succeeded",
        "test_spearman": None,
        "undefined": {"test.spearman": "constant predictions"},
        "kept": START,
        "duration_s": 3725.0,
    }


def test_status_of_an_experiment_says_what_it_kept_and_what_is_undefined(study):
    result = run(study, "status", "blat-5cab")
    lines = result.stdout.splitlines()
    assert "kept           start (val_spearman 0.7100; no epoch was clearly above the fitted start)" in lines
    assert "warning        seeds 0 and 1 kept the same start" in lines
    assert "test           spearman undef, pearson 0.0000, mse 0.5000, ndcg 0.9000" in lines
    assert "undefined      test.spearman: constant predictions" in lines
    assert "study          blat-study-1234abcd56" not in lines  # the record says no study: none shown
    doc = json.loads(run(study, "status", "blat-5cab", "--json").stdout)
    jsonschema.validate(doc, STATUS_SCHEMA)
    assert doc["kept"] == START and doc["undefined"] == {"test.spearman": "constant predictions"}


def test_stop_of_a_study_stops_its_running_points(study):
    """A point running as a local process (the wrapper the local backend starts): `infra stop STUDY`
    sends it SIGTERM, it ends, the point is recorded cancelled; the others are left as they are."""
    exp = Experiment(study / "experiments" / "blat-7e57000003")
    child = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    exp.make_layout()
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner.run.local_wrapper", str(exp.root / ".exit_code"), sys.executable, "-c", child],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        plan = plan_of(exp.id, "ridge", 2, study / "data" / "pg.db")
        make_experiment(study, exp.id, plan, None, state="running", minute=40, pid=proc.pid)
        result = run(study, "stop", "blat-study", "--timeout", "20")
        assert result.returncode == 0, result.stderr
        assert result.stderr == (
            "study blat-study-1234abcd56: stopped 1 point(s) (blat-7e57000003 cancelled); "
            "points: 4 succeeded, 1 cancelled, 1 failed\n"
        )
        assert proc.wait(timeout=20) == 143
        doc = json.loads(run(study, "stop", STUDY, "--json").stdout)
        assert doc["stopped"] == [] and doc["runner"] is None
        assert doc["states"] == {"succeeded": 4, "cancelled": 1, "failed": 1}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- compare ------------------------------------------------------------------------------------------


COMPARE = """\
experiment       test.spearman  val.spearman  test.pearson  test.mse  test.ndcg  kept         model.name  train.seed
blat-0a1b2c3d4e  0.7312         0.7210        0.7400        0.5000    0.9000     closed form  ridge       0
blat-0a9f8e7d6c  0.7312         0.7210        0.7400        0.5000    0.9000     closed form  ridge       1
blat-5c0ffee000  0.7251         0.7300        0.7000        0.5000    0.9000     epoch 3      cnn         0
blat-5cab000001  undef          0.7100        0.0000        0.5000    0.9000     start        cnn         1
"""
COMPARE_NOTES = """\
4 experiments of study blat-study-1234abcd56 (6 points); same in all: embeddings.name=onehot, \
data.dataset=BLAT_ECOLX_Stiffler_2015, split.strategy=random
left out: 1 failed (--all shows them)
not run yet: 1 point(s) of the study (blat-7e57000003)
not shown: val.pearson, val.mse, val.ndcg, n_train and 3 more (--wide shows every column, --columns NAME,… picks)
undef: test.spearman has no value in 1 experiment (constant predictions)
"""


def test_compare_a_study_metrics_first_without_noise(study):
    result = run(study, "compare", "--study", "blat-st")
    assert result.returncode == 0, result.stderr
    assert result.stdout == COMPARE
    assert result.stderr == COMPARE_NOTES
    doc = json.loads(run(study, "compare", "--study", "blat-st", "--json").stdout)
    assert doc["differing"] == ["model.name", "train.seed"]  # not tracking, resources, metrics, model.params
    assert doc["left_out"] == {"failed": 1} and doc["study"] == STUDY


def test_compare_all_shows_the_state_and_wide_and_columns_choose(study):
    every = run(study, "compare", "--study", STUDY, "--all", "--columns", "state,test.spearman,kept")
    assert every.stdout == (
        "experiment       state      test.spearman  kept\n"
        "blat-0a1b2c3d4e  succeeded  0.7312         closed form\n"
        "blat-0a9f8e7d6c  succeeded  0.7312         closed form\n"
        "blat-5c0ffee000  succeeded  0.7251         epoch 3\n"
        "blat-5cab000001  succeeded  undef          start\n"
        "blat-9dead00002  failed     -              -\n"
    )
    wide = run(study, "compare", "--study", STUDY, "--wide")
    assert wide.stdout.splitlines()[0].split() == [
        "experiment", "test.spearman", "val.spearman", "test.pearson", "test.mse", "test.ndcg", "val.pearson",
        "val.mse", "val.ndcg", "kept", "model.name", "train.seed", "n_train", "n_test", "epochs", "train_s",
    ]  # fmt: skip
    assert "not shown" not in wide.stderr
    bad = run(study, "compare", "--columns", "test.nope")
    assert (
        bad.returncode == 2
        and "--columns test.nope: no such column here; columns: experiment, test.spearman" in bad.stderr
    )


def test_compare_grouped_counts_undefined_values(study):
    result = run(study, "compare", "--study", STUDY, "--group-by", "train.seed")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "test.spearman          val.spearman           test.pearson           test.mse               kept"
        "              model.name\n"
        "0.7312 ± 0.0000 (2/2)  0.7210 ± 0.0000 (2/2)  0.7400 ± 0.0000 (2/2)  0.5000 ± 0.0000 (2/2)  closed form"
        "       ridge\n"
        "0.7251 (1/2) !         0.7200 ± 0.0141 (2/2)  0.3500 ± 0.4950 (2/2)  0.5000 ± 0.0000 (2/2)  epoch 1, start 1"
        "  cnn\n"
    )
    assert result.stderr.splitlines()[-1] == (
        "! model.name=cnn: test.spearman has a value in 1 of 2 points (1 undefined: constant predictions)"
    )
    group = json.loads(run(study, "compare", "--study", STUDY, "--group-by", "train.seed", "--json").stdout)
    cnn = group["groups"][1]
    assert cnn["test"]["spearman"] == {"mean": 0.7251, "sd": None, "n": 1, "of": 2, "undefined": 1}


def test_a_fold_study_with_one_defined_fold_is_flagged(tmp_path):
    """The issue's case: test Spearman undefined in 4 of 5 folds is `0.0029 (1/5) !`, never 0.0029."""
    work = tmp_path / "work"
    db = tmp_path / "pg.db"
    for fold in range(5):
        eid = f"blat-f0{fold}0000000"
        plan = plan_of(eid, "cnn", 0, db, split={"strategy": "modulo", "n_folds": 5, "fold": fold})
        spearman = 0.0029 if fold == 0 else None
        undefined = None if fold == 0 else {"test.spearman": "constant predictions"}
        make_experiment(work, eid, plan, metrics_doc(*scores(spearman, 0.3), EPOCH_2, undefined), minute=fold)
    result = run(work, "compare", "--group-by", "split.fold", "--columns", "test.spearman,val.spearman")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "test.spearman   val.spearman\n0.0029 (1/5) !  0.3000 ± 0.0000 (5/5)\n"
    assert result.stderr.splitlines()[-1] == (
        "! all: test.spearman has a value in 1 of 5 points (4 undefined: constant predictions)"
    )
    csv_text = run(work, "compare", "--group-by", "split.fold", "--csv", "-").stdout
    header, row = csv_text.splitlines()
    assert row.startswith("0.0029,,1,0.3,0.0,5,")


def test_csv_headers_are_unique(study):
    rows = run(study, "compare", "--study", STUDY, "--csv", "-").stdout.splitlines()
    assert rows[0] == (
        "experiment,state,test.spearman,val.spearman,test.pearson,test.mse,test.ndcg,val.pearson,val.mse,val.ndcg,"
        "undefined,kept,model.name,train.seed,n_train,n_val,n_test,epochs,train_s"
    )
    assert rows[4] == (
        "blat-5cab000001,succeeded,,0.71,0.0,0.5,0.9,-0.01,0.51,0.89,test.spearman,start,cnn,1,210,30,60,8,12.5"
    )
    grouped = run(study, "compare", "--study", STUDY, "--group-by", "train.seed", "--csv", "-").stdout.splitlines()
    assert grouped[0] == (
        "test.spearman.mean,test.spearman.sd,test.spearman.n,val.spearman.mean,val.spearman.sd,val.spearman.n,"
        "test.pearson.mean,test.pearson.sd,test.pearson.n,test.mse.mean,test.mse.sd,test.mse.n,"
        "test.ndcg.mean,test.ndcg.sd,test.ndcg.n,val.pearson.mean,val.pearson.sd,val.pearson.n,"
        "val.mse.mean,val.mse.sd,val.mse.n,val.ndcg.mean,val.ndcg.sd,val.ndcg.n,kept,model.name,points,experiments"
    )
    assert len(set(grouped[0].split(","))) == len(grouped[0].split(","))


def test_a_twenty_point_study_fits_120_columns(tmp_path):
    work = tmp_path / "work"
    db = tmp_path / "pg.db"
    points = []
    for i, (model, seed) in enumerate((m, s) for m in ("ridge", "linear", "mlp", "cnn") for s in range(5)):
        eid = f"blat-pg-{model}-{i:010x}"[:64]
        make_experiment(work, eid, plan_of(eid, model, seed, db), metrics_doc(*scores(0.7 + i / 1000, 0.7), START))
        points.append(({"model": {"name": model}, "train.seed": seed}, eid))
    write_study(work, "blat-pg-study-00000000aa", points, ["model", "train.seed"])
    result = run(work, "compare", "--study", "blat-pg-study")
    lines = result.stdout.splitlines()
    assert len(lines) == 21 and max(len(line) for line in lines) <= 120
    assert lines[0].split()[:2] == ["experiment", "test.spearman"] and lines[0].split()[-3:] == [
        "kept",
        "model.name",
        "train.seed",
    ]
    grouped = run(work, "compare", "--study", "blat-pg-study", "--group-by", "train.seed").stdout.splitlines()
    assert len(grouped) == 5 and max(len(line) for line in grouped) <= 120


def test_data_db_is_the_host_path_shortened_when_unique(tmp_path):
    work = tmp_path / "work"
    for i, db in enumerate((tmp_path / "a" / "pg.db", tmp_path / "b" / "gb1.db")):
        eid = f"blat-d{i}00000000"
        plan = plan_of(eid, "ridge", 0, Path("/data/pg.db"))  # what older plans held: the container's path
        exp = make_experiment(work, eid, plan, metrics_doc(*scores(0.5 + i / 10, 0.5), CLOSED_FORM))
        exp.update(db=str(db))  # the record says which host file it was
    result = run(work, "compare", "--columns", "data.db")
    assert result.stdout == "experiment       data.db\nblat-d100000000  gb1.db\nblat-d000000000  pg.db\n"
    doc = json.loads(run(work, "compare", "--json").stdout)
    assert {r["plan"]["data.db"] for r in doc["experiments"]} == {
        str(tmp_path / "a" / "pg.db"),
        str(tmp_path / "b" / "gb1.db"),
    }


# --- the plot -------------------------------------------------------------------------------------------


def curve(exp: Experiment, values: list[float]) -> None:
    lines = [json.dumps({"epoch": e, "val": {"spearman": v}}) for e, v in enumerate(values)]
    (exp.root / "metrics" / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_the_plot_fits_the_data_groups_the_curves_and_labels_short(study, tmp_path):
    pytest.importorskip("matplotlib")
    from runner.run import compare as lib
    from runner.run.compare_plot import draw, short_label

    for eid, values in (
        ("blat-5c0ffee000", [0.70, 0.72, 0.73]),
        ("blat-5cab000001", [0.69, 0.71, 0.71, 0.70]),
        ("blat-0a1b2c3d4e", [0.721]),
        ("blat-0a9f8e7d6c", [0.721]),
    ):
        curve(Experiment(study / "experiments" / eid), values)
    rows = lib.compare(study, [], study=STUDY).rows
    groups = lib.group_rows(rows, ["train.seed"], "spearman")
    fig = draw(rows, groups, "spearman", lib.differing_keys(rows))
    left, right = fig.axes
    low, high = left.get_ylim()
    assert 0.70 < low < 0.7251 and 0.7312 < high < 0.75  # fitted to the values, not from 0
    assert [t.get_text() for t in left.get_xticklabels()] == ["ridge", "cnn\n1/2 with a value"]
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["ridge (n=2)", "cnn (n=2)"]
    assert all(float(t).is_integer() for t in right.get_xticks())
    means = right.get_lines()[1].get_ydata()
    assert list(right.get_lines()[1].get_xdata()) == [1, 2, 3, 4]
    assert means[0] == pytest.approx(0.695) and means[3] == pytest.approx(0.70)
    ungrouped = draw(rows, None, "spearman", lib.differing_keys(rows))
    assert [t.get_text() for t in ungrouped.axes[0].get_xticklabels()][0] == "model=ridge\nseed=0"
    # one line per key, and a key a group does not have (an mlp's channels) is not shown as null
    assert short_label({"model.name": "mlp", "model.params.channels": None, "model.params.hidden": 64}, "x") == (
        "model=mlp\nhidden=64"
    )
    assert short_label({"model.params.channels": None}, "fallback") == "fallback"
    target = tmp_path / "study.png"
    result = run(study, "compare", "--study", STUDY, "--group-by", "train.seed", "--plot", str(target))
    assert result.returncode == 0 and target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the training's files are untrusted -----------------------------------------------------------------


def test_kept_and_undefined_are_checked_cut_and_cleaned():
    hostile = {
        "kept": {
            "model": "epoch",
            "epoch": "3",
            "by": 7,
            "value": float("nan"),
            "best_trained": [1],
            "why": "\x1b]0;pwned\x07fine\x1b[2J" + "x" * 1000,
            "warning": ["no"],
        },  # fmt: skip
        "undefined": {"test.spearman": "\x1b[31mconstant\x1b[0m\n", "bogus": "x", 3: "y", "val.x": 5},
        "test": {"spearman": None, "pearson": 0.5},
    }
    kept = kept_of(hostile)
    assert kept["epoch"] is None and kept["by"] is None and kept["value"] is None and kept["best_trained"] is None
    assert kept["why"].startswith("fine") and len(kept["why"]) == 300 and kept["warning"] is None
    assert undefined_of(hostile) == {"test.spearman": "constant ", "val.x": "undefined"}
    assert kept_of({"kept": {"model": "rm -rf"}}) is None
    assert kept_of({"selected": "epoch", "best_epoch": 4})["epoch"] == 4  # before `kept` existed
    assert kept_of({"selected": "start", "best_epoch": None})["model"] == "start"


def test_untrusted_text_never_reaches_the_terminal(study):
    exp = Experiment(study / "experiments" / "blat-0a1b2c3d4e")
    plan = json.loads((exp.root / "config" / "plan.json").read_text())
    plan["model"]["name"] = "ridge\x1b]8;;http://evil\x07[link=http://x]y"
    plan["train"]["optimizer"] = "$\\frac{a}{"  # matplotlib's math text: a plan value must stay text
    (exp.root / "config" / "plan.json").write_text(json.dumps(plan))
    metrics = json.loads((exp.root / "metrics" / "metrics.json").read_text())
    metrics["test"]["\x1b[2Jspearman\x1b]0;pwned\x07"] = 0.1234  # cleaned, it would pass for `spearman`
    (exp.root / "metrics" / "metrics.json").write_text(json.dumps(metrics))
    for args in (["ls"], ["compare", "--study", STUDY, "--wide"], ["status", STUDY], ["status", exp.root.name]):
        result = run(study, *args)
        assert result.returncode == 0, (args, result.stderr)
        assert "\x1b" not in result.stdout + result.stderr and "\x07" not in result.stdout, args
    wide = run(study, "compare", "--study", STUDY, "--wide", "--json").stdout
    assert "0.1234" not in wide and "pwned" not in wide  # dropped, not shown nor cleaned into another name
    plot = run(study, "compare", "--study", STUDY, "--plot", str(study / "p.png"))
    assert plot.returncode == 0 and (study / "p.png").read_bytes()[:4] == b"\x89PNG", plot.stderr


def test_pure_shortening_rules():
    from runner.run.compare import differing_keys
    from runner.run.views import duration_text, short_datasets, short_paths

    assert short_datasets(["BLAT_ECOLX_Stiffler_2015"]) == {"BLAT_ECOLX_Stiffler_2015": "BLAT_ECOLX"}
    both = short_datasets(["BLAT_ECOLX_Stiffler_2015", "BLAT_ECOLX_Firnberg_2014"])
    assert both == {
        "BLAT_ECOLX_Firnberg_2014": "BLAT_ECOLX_Firnberg…",
        "BLAT_ECOLX_Stiffler_2015": "BLAT_ECOLX_Stiffler…",
    }
    assert short_datasets(["GB1", "SPG1_STRSG_Wu_2016"]) == {"GB1": "GB1", "SPG1_STRSG_Wu_2016": "SPG1_STRSG"}
    assert short_paths(["/a/pg.db", "/b/pg.db"]) == {"/a/pg.db": "/a/pg.db", "/b/pg.db": "/b/pg.db"}
    assert short_paths(["/a/pg.db", "/b/gb1.db"]) == {"/a/pg.db": "pg.db", "/b/gb1.db": "gb1.db"}
    assert [duration_text(s) for s in (None, 4.4, 65, 3725, 90000)] == ["-", "4s", "1m05s", "1h02m", "1d01h"]
    rows = [
        {"plan": {"name": "a", "model.params": "{}", "metrics": '["x"]', "tracking": None, "resources.gpus": "none"}},
        {"plan": {"name": "b", "model.params": None, "metrics": '["y"]', "tracking.uri": "u", "resources.gpus": "all"}},
        {"plan": {"name": "c", "train.seed": 1}},
    ]
    assert differing_keys(rows) == ["train.seed"]


def test_nothing_to_compare_says_so_and_what_was_left_out(tmp_path):
    work = tmp_path / "work"
    make_experiment(work, "blat-f000000000", plan_of("blat-f000000000", "cnn", 0, tmp_path / "x.db"), None, "failed")
    result = run(work, "compare", "--where", "model.name=cnn")
    assert (result.returncode, result.stdout) == (0, "")
    assert result.stderr == "no experiment to compare\nleft out: 1 failed (--all shows them)\n"
