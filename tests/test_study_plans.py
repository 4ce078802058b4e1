"""Studies checked before anything starts: named points, every fold, components with "did you mean", the dry run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runner.errors import PlanError, UsageError
from runner.plan.load import load_plan
from runner.run import sweep
from tests.e2e import REPO
from tests.helpers import infra


def plan_text(db: Path, **extra) -> str:
    doc = {"name": "blat", "data": {"db": str(db)}, "model": {"name": "mlp"}}
    for key, value in extra.items():
        doc[key.replace("__", ".")] = value
    return json.dumps(doc)


def test_name_placeholders_are_filled_from_the_plan(mini_db):
    text = plan_text(mini_db, name="blat-{model.name}-s{train.seed}-f{split.fold}", **{"split__n_folds": 5})
    loaded = load_plan("p.json", ["train.seed=3", "split.fold=2"], text=text)
    assert loaded.plan.name == "blat-mlp-s3-f2"
    # the same placeholders in a sweep point and in a single run give the same name (and id)
    point = sweep.load_points("p.json", text, [], [{"train.seed": 3, "split.fold": 2}], mini_db.parent)[0]
    assert point.plan.name == loaded.plan.name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("x-{model.nope}", "p.json: name: placeholder {model.nope}: no such plan key with a single value"),
        ("x-{model.params}", "p.json: name: placeholder {model.params}: no such plan key with a single value"),
        ("{data.db}", "p.json: name: '{data.db}' fills to"),
        ("..", "p.json: name: '..': a name is 1-64 of a-z 0-9 . _ - (starting a-z0-9)"),
    ],
)
def test_bad_placeholders_are_plan_errors(mini_db, name, message):
    with pytest.raises(PlanError) as info:
        load_plan("p.json", text=plan_text(mini_db, name=name))
    assert str(info.value).startswith(message)
    assert info.value.exit_code == 2


def test_a_placeholder_value_is_lowercased_and_made_a_valid_name(mini_db):
    text = plan_text(mini_db, name="run-{data.target}-{train.lr}")
    assert load_plan("p.json", text=text).plan.name == "run-dms_score-0.001"


def test_point_labels_name_the_swept_values():
    assert sweep.point_label({"model": {"name": "mlp", "params": {}}, "train.seed": 1}) == "mlp-seed1"
    assert sweep.point_label({"split.fold": 0, "train.lr": 0.001}) == "fold0-lr0.001"
    assert sweep.point_label({"data.dataset": "BLAT_ECOLX"}) == "BLAT_ECOLX"


def test_a_study_is_named_by_what_its_points_names_share():
    from runner.run.study import study_name

    # placeholders: the shared part up to its last separator, never the first point's filled name
    assert study_name(["blat-ridge-s0-f0", "blat-mlp-s0-f1", "blat-cnn-s1-f4"]) == "blat"
    assert study_name(["blat-ridge-s0-f0", "blat-ridge-s0-f1"]) == "blat-ridge-s0"
    assert study_name(["a-1", "a-10"]) == "a"
    assert study_name(["blat-demo", "blat-demo"]) == "blat-demo"  # no placeholders: the plan's name
    assert study_name(["ridge-s0", "mlp-s0"]) == "study"  # nothing shared


def test_every_fold_of_a_plan(mini_db):
    def folds(**split):
        return sweep.fold_sweep(load_plan("p.json", text=plan_text(mini_db, split=split)))

    assert folds(strategy="random", n_folds=3) == "split.fold=[0, 1, 2]"
    assert folds(strategy="modulo") == "split.fold=[0, 1, 2, 3, 4]"  # the core's default of 5 position folds
    with pytest.raises(PlanError, match="split.fold: 'all' needs split.n_folds"):
        load_plan("p.json", text=plan_text(mini_db, split={"strategy": "random", "fold": "all"}))
    with pytest.raises(PlanError, match="split.fold: 'all' needs a k-fold strategy"):
        load_plan("p.json", text=plan_text(mini_db, split={"strategy": "mut_num", "fold": "all"}))
    with pytest.raises(UsageError, match="has no folds without split.n_folds"):
        folds(strategy="random")


def test_components_are_checked_with_did_you_mean():
    from runner.workdir.components import Components, check_plans

    rows = [
        {"kind": "model", "name": "cnn", "params": [{"name": "channels", "type": "int", "default": 32, "required": False}],
         "open_params": False},
        {"kind": "model", "name": "linear", "params": [{"name": "l2", "type": "float", "default": 1.0, "required": False}],
         "open_params": False},
        {"kind": "model", "name": "needs", "params": [{"name": "k", "type": None, "default": None, "required": True}],
         "open_params": False},
        {"kind": "model", "name": "anything", "params": [], "open_params": True},
        {"kind": "embedding", "name": "onehot", "params": [], "open_params": False},
        {"kind": "vocab", "name": "IUPAC", "params": [], "open_params": False},
        {"kind": "metric", "name": "spearman", "params": [], "open_params": False},
    ]  # fmt: skip
    comps = Components.of(rows)

    def plan(model, metrics=("spearman",)):
        text = json.dumps({"name": "x", "data": {"db": "/nonexistent.db"}, "model": model, "metrics": list(metrics)})
        return load_plan("p.json", text=text, check_db=False).plan

    issues = check_plans(
        [plan({"name": "cnnn"}), plan({"name": "linear", "params": {"channels": 8}}), plan({"name": "needs"}),
         plan({"name": "anything", "params": {"z": 1}}), plan({"name": "cnn"}, metrics=["spearmen"])],
        comps,
        ["a", "b", "c", "d", "e"],
    )  # fmt: skip
    assert [f"{i.path}: {i.message}" for i in issues] == [
        "[a] model.name: unknown model 'cnnn'; did you mean 'cnn'? registered: anything, cnn, linear, needs",
        "[b] model.params: model 'linear' has no parameter 'channels'; it takes: l2",
        "[c] model.params: model 'needs' needs 'k'",
        "[e] metrics[0]: unknown metric 'spearmen'; did you mean 'spearman'? registered: spearman",
    ]


def test_the_component_cache_follows_no_link_and_reads_a_bounded_file(tmp_path, monkeypatch):
    """The node cache is a file anyone who could write the cache folder may have planted: a link at an
    entry is neither read through nor written through, an oversized entry is a miss."""
    from types import SimpleNamespace

    from runner.workdir import components as comps
    from runner.workdir import plugins

    monkeypatch.setenv("INFRA_CACHE_DIR", str(tmp_path / "cache"))
    rows = [{"kind": "model", "name": "cnn", "source_file": "", "builtin": True, "params": [], "open_params": False}]
    victim = tmp_path / "victim.json"
    victim.write_text(json.dumps(rows))
    folder = comps.cache_dir()
    folder.mkdir(parents=True)
    (folder / "aaaa.json").symlink_to(victim)
    assert comps.cached("aaaa") is None  # a link: a miss, not the victim's rows
    (folder / "bbbb.json").write_bytes(b" " * (plugins.MAX_DOCUMENT_BYTES + 1))
    assert comps.cached("bbbb") is None  # too large: not parsed

    monkeypatch.setattr(plugins, "discover", lambda workdir, backend, on_log: SimpleNamespace(components=rows))
    found = comps.components(tmp_path, None, SimpleNamespace(image_hash="aaaa"), None)
    assert set(found.by_kind["model"]) == {"cnn"}
    assert victim.read_text() == json.dumps(rows) and not (folder / "aaaa.json").is_symlink()
    assert set(comps.cached("aaaa").by_kind["model"]) == {"cnn"}


@pytest.fixture
def local_work(tmp_path, monkeypatch) -> Path:
    from runner.data.importer import build_demo_db

    monkeypatch.setenv("INFRA_CACHE_DIR", str(tmp_path / "cache"))
    work = tmp_path / "work"
    shutil.copytree(REPO / "plugins_template", work)
    build_demo_db(work / "data" / "blat.db")
    (work / "plans" / "small.json").write_text(
        json.dumps(
            {
                "name": "blat-{model.name}-f{split.fold}",
                "data": {"db": "data/blat.db", "limit": 300},
                "model": {"name": "ridge"},
                "split": {"strategy": "random", "n_folds": 3},
                "train": {"max_epochs": 1},
            }
        )
    )
    return work


@pytest.mark.core
def test_a_sweep_with_a_wrong_model_fails_before_anything_starts(local_work):
    models = '[{"name":"ridge"},{"name":"cnn","params":{"channels":8}},{"name":"linear","params":{"channels":8}}]'
    result = infra("run", "plans/small.json", "--backend", "local", "--sweep", f"model={models}", workdir=local_work)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "infra: error: plans/small.json: [linear] model.params: model 'linear' has no parameter 'channels'; "
        "it takes: l2, lr_scale, init"
    )
    assert not (local_work / "experiments").exists() or not list((local_work / "experiments").glob("blat-*"))
    single = infra("run", "plans/small.json", "--backend", "local", "--set", "model.name=cnnn", workdir=local_work)
    assert single.returncode == 2
    assert "model.name: unknown model 'cnnn'; did you mean 'cnn'?" in single.stderr
    assert not list((local_work / "experiments").glob("blat-*"))


@pytest.mark.core
def test_a_sweep_may_complete_the_plan_it_sweeps(local_work):
    # the base plan alone has no model.params.hidden for its name: each point has (the fold check read
    # the whole base plan and refused it)
    plan = json.loads((local_work / "plans" / "small.json").read_text())
    plan.update(name="blat-h{model.params.hidden}", model={"name": "mlp"})
    (local_work / "plans" / "hidden.json").write_text(json.dumps(plan))
    dry = infra("run", "plans/hidden.json", "--backend", "local", "--sweep", "model.params.hidden=8,16", "--dry-run",
                workdir=local_work)  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert [line.split()[3][: len("blat-h16")] for line in dry.stdout.splitlines()[2:4]] == ["blat-h8-", "blat-h16"]
    alone = infra("run", "plans/hidden.json", "--backend", "local", "--dry-run", workdir=local_work)
    assert alone.returncode == 2
    assert "placeholder {model.params.hidden}: no such plan key with a single value" in alone.stderr


@pytest.mark.core
@pytest.mark.slow
def test_cv_runs_every_fold_and_the_dry_run_says_what_would_happen(local_work):
    dry = infra("run", "plans/small.json", "--backend", "local", "--cv", "--dry-run", workdir=local_work)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.strip().splitlines()
    assert lines[0].startswith("study blat-ridge-study-") and lines[0].endswith(": 3 point(s), backend local")
    assert lines[1].split() == ["#", "split.fold", "point", "experiment", "would"]
    assert [line.split()[2] for line in lines[2:5]] == ["fold0", "fold1", "fold2"]
    assert all(line.split()[3].startswith(f"blat-ridge-f{i}-") and line.endswith("run") for i, line in
               enumerate(lines[2:5]))  # fmt: skip

    run = infra("run", "plans/small.json", "--backend", "local", "--cv", "--json", workdir=local_work)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert [p["values"] for p in doc["experiments"]] == [{"split.fold": 0}, {"split.fold": 1}, {"split.fold": 2}]
    assert [p["experiment_id"].rsplit("-", 1)[0] for p in doc["experiments"]] == [f"blat-ridge-f{i}" for i in range(3)]
    assert doc["study_id"] == lines[0].split()[1].rstrip(":")

    again = infra("run", "plans/small.json", "--backend", "local", "--cv", "--dry-run", "--json", workdir=local_work)
    assert [p["action"] for p in json.loads(again.stdout)["points"]] == ["report (already succeeded)"] * 3


def test_the_study_board_redraws_the_points_as_they_end():
    import io

    from rich.console import Console

    from runner.cli.sweep import StudyBoard

    out = io.StringIO()
    board = StudyBoard(2, ["ridge-seed0", "mlp-seed0"], console=Console(file=out, width=80, force_terminal=False))
    board.update(1, "running")
    board.update(1, "succeeded", 0.68245, 2.04)
    board.update(2, "failed")
    text = board._table()
    board.stop()
    from rich.console import Console as Plain

    rendered = io.StringIO()
    Plain(file=rendered, width=80).print(text)
    lines = [line.rstrip() for line in rendered.getvalue().splitlines()]
    assert lines[0] == "study: 2/2 done"
    assert any("ridge-seed0" in line and "succeeded" in line and "0.6825" in line and "2.0" in line for line in lines)
    assert any("mlp-seed0" in line and "failed" in line for line in lines)
