"""`infra predict` end to end on real trained models: an ensemble of a study's seeds in the
experiments' own images (mean, std and n equal to the members' own single predictions combined;
`--top 3 --rank ucb:1.0`; `--out -` into a pipe; the table), and the same with the local backend.
The module imports no torch: the models run in containers, or (the `core` test) in the core process
that `--backend local` starts."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import pytest

from tests.helpers import REPO, cli, infra


def read_csv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def write_input(path: Path, mutants: list[str]) -> None:
    """The input: ids, a note with a formula (kept, neutralised), the mutants, one the template refuses."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "mutant", "note"])
        writer.writerows([f"v{i}", m, "=1+1" if i == 0 else "design"] for i, m in enumerate(mutants))


def check_ensemble(full: list[dict], singles: dict[str, list[dict]]) -> None:
    """Each ensemble row is the mean, sample std and count of the members' own predictions."""
    assert list(full[0]) == ["mutant", "id", "note", "sequence", "prediction", "std", "n", "error", "measured",
                             "in_train"]  # fmt: skip
    members = list(singles.values())
    assert all(len(s) == len(full) for s in members)
    for i, row in enumerate(full):
        values = [float(s[i]["prediction"]) for s in members if s[i]["prediction"]]
        assert row["mutant"] == members[0][i]["mutant"] and row["id"] == f"v{i}"
        assert int(row["n"]) == len(values)
        if not values:
            assert row["prediction"] == row["std"] == "" and row["error"] == members[0][i]["error"] != ""
            continue
        assert float(row["prediction"]) == pytest.approx(statistics.fmean(values), rel=1e-12, abs=1e-12)
        assert float(row["std"]) == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-12)
        assert row["measured"] in ("true", "false") and 0 <= int(row["in_train"]) <= len(members)
        assert int(row["in_train"]) == sum(s[i]["in_train"] == "true" for s in members)
    assert full[0]["note"] == "'=1+1"  # an input column's formula, neutralised


def top_by_ucb(full: list[dict], n: int, k: float) -> list[str]:
    scored = [(float(r["prediction"]) + k * float(r["std"]), i) for i, r in enumerate(full) if r["prediction"]]
    return [full[i]["mutant"] for _, i in sorted(scored, key=lambda t: (-t[0], t[1]))[:n]]


# --- the experiments' own images ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def seeds(run_user, base_image) -> tuple[Path, str, list[str]]:
    """(workdir, study id, experiment ids): the demo plan swept over 3 seeds in docker (400 variants, 2 epochs)."""
    from runner.data.importer import build_demo_db
    from tests.e2e import infra_as

    uid, gid, _ = run_user
    top = Path(tempfile.mkdtemp(prefix="infra-e2e-ensemble-", dir="/tmp"))  # the run user must enter it
    work = top / "work"
    shutil.copytree(REPO / "plugins_template", work)
    build_demo_db(work / "data" / "blat_ecolx.db")
    for path in [top, work, *work.rglob("*")]:
        os.chown(path, uid, gid)
    args = ("run", "plans/demo.json", "--sweep", "train.seed=1,2,3", "--set", "data.limit=400")
    r = infra_as(run_user, *args, "--set", "train.max_epochs=2", "--json", workdir=work)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    yield work, doc["study_id"], [e["experiment_id"] for e in doc["experiments"]]
    shutil.rmtree(top, ignore_errors=True)


@pytest.mark.docker
@pytest.mark.slow
def test_a_studys_ensemble_is_its_members_predictions_combined(seeds, run_user, docker_client):
    import pandas as pd

    from tests.e2e import chown_to, infra_as, labelled_containers

    work, sid, ids = seeds
    ref = pd.read_parquet(work / "experiments" / ids[0] / "artifacts" / "predictions.parquet")
    inp = work / "variants.csv"
    write_input(inp, ["X1A", *ref["mutant"].head(60)])  # the first row cannot be predicted
    chown_to(run_user, inp)

    singles = {}
    for eid in ids:
        r = infra_as(run_user, "predict", eid, str(inp), "--out", "-", workdir=work)  # a pipe: the CSV
        assert r.returncode == 0, r.stderr[-3000:]
        assert "wrote 61 rows to the" not in r.stderr and "predicted 60 of 61 rows" in r.stderr
        singles[eid] = read_csv(r.stdout)
        assert list(singles[eid][0]) == ["mutant", "id", "note", "sequence", "prediction", "error", "measured",
                                         "in_train"]  # fmt: skip
    assert not (work / "-").exists()

    # the whole ensemble into a pipe: every row, mean/std/n equal to the members' combined
    r = infra_as(run_user, "predict", "--study", sid, str(inp), "--out", "-", workdir=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ensemble of 3 models" in r.stderr and "predicted 60 of 61 rows" in r.stderr
    full = read_csv(r.stdout)
    check_ensemble(full, singles)

    # --top 3 by ucb into a file, the table on stdout (--table: stdout is a pipe here) with the sequences
    out = work / "top.csv"
    args = ("predict", *ids, str(inp), "--top", "3", "--rank", "ucb:1.0", "--out", str(out), "--table", "--sequences")
    r = infra_as(run_user, *args, workdir=work)
    assert r.returncode == 0, r.stderr[-3000:]
    top = read_csv(out.read_text())
    assert [row["mutant"] for row in top] == top_by_ucb(full, 3, 1.0)
    assert list(top[0])[4:8] == ["prediction", "std", "n", "ucb"]
    for row in top:
        assert float(row["ucb"]) == pytest.approx(float(row["prediction"]) + float(row["std"]))
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["mutant", "id", "note", "sequence", "prediction", "std", "n", "ucb", "measured",
                                "in_train"]  # fmt: skip
    assert len(lines) == 4 and lines[1].split()[0] == top[0]["mutant"] and top[0]["sequence"] in lines[1]
    assert os.stat(out).st_uid == run_user[0]
    assert labelled_containers(docker_client, work) == []  # every member's container is removed
    assert not [p for p in work.iterdir() if p.name.startswith(".infra-predict-")]
    # the members' image says its core predicts several experiments in one run (what grouping asks)
    record = json.loads((work / "experiments" / ids[0] / "status.json").read_text())
    assert docker_client.images.get(record["image_id"]).labels["infra.core_api"] == "2"


@pytest.mark.docker
@pytest.mark.slow
def test_a_study_whose_points_are_other_configurations_is_refused(seeds, run_user):
    from tests.e2e import infra_as

    work, sid, ids = seeds
    # a point of another learning rate joins the study's record: the ensemble would mix two models
    study = work / "studies" / f"{sid}.json"
    doc = json.loads(study.read_text())
    r = infra_as(run_user, "run", "plans/demo.json", "--set", "data.limit=400", "--set", "train.max_epochs=1",
                 "--set", "train.lr=0.01", "--json", workdir=work)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    other = json.loads(r.stdout)["experiment_id"]
    doc["points"].append({"index": len(doc["points"]) + 1, "values": {}, "experiment_id": other})
    study.write_text(json.dumps(doc))
    try:
        r = infra_as(run_user, "predict", "--study", sid, "--saturation", workdir=work)
        assert r.returncode == 2 and "differ in train.lr" in r.stderr and "train.max_epochs" in r.stderr, r.stderr
        assert not list(work.glob("predictions-*"))
    finally:
        doc["points"].pop()
        study.write_text(json.dumps(doc))


# --- the local backend (the core as a host process) -----------------------------------------------------


@pytest.fixture(scope="module")
def local_seeds(tmp_path_factory) -> tuple[Path, str, list[str]]:
    """A study of 2 seeds trained by `infra run --backend local` (300 variants, 1 epoch)."""
    from runner.data.importer import build_demo_db

    work = tmp_path_factory.mktemp("ensemble-local") / "work"
    shutil.copytree(REPO / "plugins_template", work)
    build_demo_db(work / "data" / "blat_ecolx.db")
    r = infra(
        "run", "plans/demo.json", "--backend", "local", "--sweep", "train.seed=1,2", "--set", "data.limit=300",
        "--set", "train.max_epochs=1", "--json", workdir=work,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    return work, doc["study_id"], [e["experiment_id"] for e in doc["experiments"]]


@pytest.mark.core  # the local backend runs the training core in this Python
@pytest.mark.slow
def test_local_ensemble_to_stdout_and_the_table(local_seeds, tmp_path):
    work, sid, ids = local_seeds
    template = json.loads((work / "experiments" / ids[0] / "config" / "predict.json").read_text())
    template = template["sources"][0]["template"]
    inp = tmp_path / "in.csv"
    write_input(inp, ["X1A", *(f"{template[p]}{p + 1}A" for p in range(1, 40) if template[p] != "A")])

    singles = {}
    for eid in ids:
        r = cli("predict", eid, str(inp), "--out", "-", "--backend", "local", workdir=work, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        singles[eid] = read_csv(r.stdout)
    r = cli("predict", *ids, str(inp), "--out", "-", "--backend", "local", "--json", workdir=work, cwd=tmp_path)
    assert r.returncode == 2 and "--json and --out - both write stdout" in r.stderr
    r = cli("predict", *ids, str(inp), "--out", "-", "--backend", "local", workdir=work, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    full = read_csv(r.stdout)
    check_ensemble(full, singles)

    # a file and its table: the first 10 rows, no sequences unless asked, a line saying where the rest is
    out = tmp_path / "p.parquet"
    r = cli("predict", "--study", sid, str(inp), "--out", str(out), "--table", "--backend", "local", workdir=work)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["mutant", "id", "note", "prediction", "std", "n", "measured", "in_train", "error"]
    assert len(lines) == 11 and template not in r.stdout
    assert f"showing the first 10 of {len(full)} rows; all of them: the file at {out}" in r.stderr
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    assert table.column("mutant").to_pylist() == [row["mutant"] for row in full]
    assert table.column("n").to_pylist() == [int(row["n"]) for row in full]
    means = [float(row["prediction"]) if row["prediction"] else None for row in full]
    got = table.column("prediction").to_pylist()
    assert all((a is None and b is None) or math.isclose(a, b, rel_tol=1e-12) for a, b in zip(got, means, strict=True))
    r = cli("predict", "--study", sid, str(inp), "--out", "-", "--table", "--sequences", "--top", "2",
            "--backend", "local", workdir=work)  # fmt: skip
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 3 and "sequence" in r.stdout.splitlines()[0]
    assert "wrote 2 rows to the table above" in r.stderr
    r = cli("predict", "--study", sid, str(inp), "--out", str(tmp_path / "j.csv"), "--json", "--backend", "local",
            workdir=work)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    members = json.loads(r.stdout)["members"]
    assert [m["experiment_id"] for m in members] == ids
    assert {m["run"] for m in members} == {0} and len({m["seconds"] for m in members}) == 1  # one core run


@pytest.mark.core
@pytest.mark.slow
def test_the_member_that_fails_a_shared_run_is_named_and_nothing_is_written(local_seeds, tmp_path):
    """The members of one image run in one core process; when the second one's checkpoint is not a
    checkpoint, the first has already predicted: the error names the second, nothing is written."""
    work, sid, ids = local_seeds
    ckpt = work / "experiments" / ids[1] / "ckpts" / "best.ckpt"
    kept = ckpt.read_bytes()
    ckpt.write_bytes(b"not a checkpoint")
    try:
        out = tmp_path / "p.csv"
        r = cli("predict", *ids, "--saturation", "--out", str(out), "--backend", "local", workdir=work, cwd=tmp_path)
    finally:
        ckpt.write_bytes(kept)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"prediction with {ids[1]}: " in r.stderr and "best.ckpt: not a usable checkpoint" in r.stderr
    assert ids[0] + ":" not in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".infra-predict-*"))
