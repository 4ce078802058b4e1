"""`infra run --sweep` and `infra compare`: grid expansion, validation first, real runs, exit codes, the queue.

The runs use the local backend (a real training process on the demo database, shrunk with
data.limit and one epoch); the docker path of a sweep is in the template case (tests/cases/).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runner.errors import UsageError
from runner.run.sweep import grid, label, parse_sweep
from tests.helpers import cli, infra
from tests.test_queue import redis_server  # noqa: F401  a real redis-server for --submit

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--set", "train.max_epochs=1", "--set", "data.limit=600"]
BOOM = (
    "import torch\n"
    "from runner.core.models import ProteinModel, register_model\n\n\n"
    "@register_model('boom')\n"
    "class Boom(ProteinModel):\n"
    "    def __init__(self, seq_len, in_dim, n_outputs=1):\n"
    "        super().__init__(seq_len, in_dim, n_outputs)\n"
    "        self.w = torch.nn.Linear(1, 1)\n\n"
    "    def forward(self, x):\n"
    "        raise RuntimeError('boom on purpose')\n"
)


@pytest.fixture
def demo_workdir(tmp_path) -> Path:
    from runner.data.importer import build_demo_db

    work = tmp_path / "work"
    shutil.copytree(REPO / "plugins_template", work)
    build_demo_db(work / "data" / "blat_ecolx.db")
    return work


# --- the grid ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("train.lr=1e-3,1e-4", ("train.lr", [0.001, 0.0001])),
        ("model.name=linear,mlp", ("model.name", ["linear", "mlp"])),
        ("model.params.hidden=64", ("model.params.hidden", [64])),
        ("x=true,null,abc", ("x", [True, None, "abc"])),
        ('data.dataset=["A,B","C"]', ("data.dataset", ["A,B", "C"])),
        ('metrics=[["spearman"],["spearman","ndcg"]]', ("metrics", [["spearman"], ["spearman", "ndcg"]])),
        ("train.lr=[0.1,0.2]", ("train.lr", [0.1, 0.2])),
        ("name=[a,b", ("name", ["[a", "b"])),  # not JSON: split on commas
    ],
)
def test_parse_sweep(item, expected):
    assert parse_sweep(item) == expected


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("train.lr", "expected KEY=V1,V2"),
        ("=1,2", "expected KEY=V1,V2"),
        ("train.lr=", "expected KEY=V1,V2"),
        ("train.lr=[]", "give at least one value"),
        ("train.lr=0.1,0.1", "value 0.1 is given twice"),
    ],
)
def test_parse_sweep_errors(item, message):
    with pytest.raises(UsageError, match=message):
        parse_sweep(item)


def test_grid_is_the_cartesian_product_first_sweep_slowest():
    points = grid(["train.lr=1e-3,1e-4", "model.params.hidden=64,128"])
    assert points == [
        {"train.lr": 0.001, "model.params.hidden": 64},
        {"train.lr": 0.001, "model.params.hidden": 128},
        {"train.lr": 0.0001, "model.params.hidden": 64},
        {"train.lr": 0.0001, "model.params.hidden": 128},
    ]
    assert label({"model.name": "mlp", "train.lr": 0.1}) == "model.name=mlp train.lr=0.1"


def test_grid_rejects_a_key_twice_and_huge_grids():
    with pytest.raises(UsageError, match="--sweep train.lr is given more than once"):
        grid(["train.lr=1,2", "train.lr=3"])
    many = ",".join(str(i) for i in range(40))
    with pytest.raises(UsageError, match="makes 1600 experiments"):
        grid([f"a={many}", f"b={many}"])


def test_point_values_apply_like_set(mini_db, tmp_path):
    from runner.plan.load import load_plan
    from runner.run.sweep import load_points

    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"name": "x", "data": {"db": str(mini_db)}, "model": {"name": "linear"}}))
    points = grid(["model.name=mlp,cnn", "train.lr=0.01"])
    loaded = load_points(str(plan), None, ["train.lr=0.5", "train.seed=3"], points, tmp_path)
    assert [lp.resolved["model"]["name"] for lp in loaded] == ["mlp", "cnn"]
    assert {lp.resolved["train"]["lr"] for lp in loaded} == {0.01}  # the swept key wins over --set
    assert {lp.resolved["train"]["seed"] for lp in loaded} == {3}
    same = load_plan(str(plan), ["model.name=mlp", "train.lr=0.01", "train.seed=3"], workdir=tmp_path)
    assert loaded[0].resolved == same.resolved


# --- the command ------------------------------------------------------------------------------------


def test_every_point_is_validated_before_anything_runs(demo_workdir):
    result = cli("run", "plans/demo.json", "--backend", "local", "--sweep", "train.lr=0.01,-1", workdir=demo_workdir)
    assert result.returncode == 2
    assert "plans/demo.json (sweep point 2: train.lr=-1): train.lr:" in result.stderr
    assert not (demo_workdir / "experiments").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--detach"], "--detach does not go with --sweep"),
        (["--events"], "--events does not go with --sweep"),
        (["--submit"], "--submit needs --redis URL"),
    ],
)
def test_sweep_option_conflicts(demo_workdir, extra, message):
    result = cli("run", "plans/demo.json", "--sweep", "train.lr=0.1,0.2", *extra, workdir=demo_workdir)
    assert result.returncode == 2 and message in result.stderr


def test_submit_without_sweep_points_to_infra_submit(demo_workdir):
    result = cli("run", "plans/demo.json", "--submit", workdir=demo_workdir)
    assert result.returncode == 2 and "use 'infra submit PLAN --redis URL'" in result.stderr


@pytest.mark.core  # trains with the local backend
@pytest.mark.slow
def test_sweep_runs_each_point_reports_worst_exit_and_compares(demo_workdir):
    (demo_workdir / "model" / "boom.py").write_text(BOOM)
    args = ["run", "plans/demo.json", "--backend", "local", *SMALL, "--sweep", "model.name=linear,boom"]
    result = infra(*args, "--sweep", "train.lr=0.001", "--json", workdir=demo_workdir)
    assert result.returncode == 1, result.stderr[-2000:]
    doc = json.loads(result.stdout)
    assert doc["exit_code"] == 1
    ok, bad = doc["experiments"]
    assert ok["values"] == {"model.name": "linear", "train.lr": 0.001}
    assert (ok["state"], ok["exit_code"], ok["reused"]) == ("succeeded", 0, False)
    assert ok["test"]["spearman"] > 0.2 and ok["n"]["selected"] == 600
    assert (bad["state"], bad["exit_code"]) == ("failed", 1)
    assert bad["experiment_id"] != ok["experiment_id"]
    assert "boom on purpose" in (Path(bad["exp_dir"]) / "container.log").read_text()

    again = infra(*args, "--sweep", "train.lr=0.001", workdir=demo_workdir)  # idempotent, human output
    assert again.returncode == 1
    assert f"[1/2] model.name=linear train.lr=0.001: {ok['experiment_id']} succeeded (already succeeded" in again.stderr
    table = again.stdout.splitlines()
    assert table[0].split()[:6] == ["#", "point", "experiment", "state", "kept", "test.spearman"]
    assert table[1].split()[:6] == ["1", "linear-lr0.001", ok["experiment_id"], "succeeded", "(reused)", "start"]
    assert table[2].split()[:5] == ["2", "boom-lr0.001", bad["experiment_id"], "failed", "-"]

    compared = cli("compare", bad["experiment_id"], ok["experiment_id"], "--json", workdir=demo_workdir)
    assert compared.returncode == 0, compared.stderr
    rows = json.loads(compared.stdout)["experiments"]
    assert [r["experiment_id"] for r in rows] == [ok["experiment_id"], bad["experiment_id"]]  # no metrics: last
    assert rows[0]["model"] == "linear" and rows[0]["embedding"] == "onehot"
    assert rows[0]["test"] == ok["test"] and rows[0]["n"]["train"] > 0 and rows[0]["training_seconds"] > 0
    human = cli("compare", "--metric", "mse", workdir=demo_workdir)
    assert human.returncode == 0
    assert human.stdout.splitlines()[0].split()[:2] == ["experiment", "test.mse"]  # metrics first (docs/cli.md)
    unknown = infra("compare", ok["experiment_id"], "nope-0000000000", workdir=demo_workdir)
    assert unknown.returncode == 4
    assert "no experiment 'nope-0000000000'" in unknown.stderr


def test_compare_sorts_best_first_with_lower_is_better_errors():
    from runner.run.compare import sort_rows

    rows = [
        {"experiment_id": "a", "test": {"spearman": 0.5, "mse": 2.0}, "val": {}},
        {"experiment_id": "b", "test": {"spearman": 0.7, "mse": 3.0}, "val": {"spearman": 0.1}},
        {"experiment_id": "c", "test": {}, "val": {}},
    ]
    assert [r["experiment_id"] for r in sort_rows(rows, "spearman")] == ["b", "a", "c"]
    assert [r["experiment_id"] for r in sort_rows(rows, "mse")] == ["a", "b", "c"]
    assert [r["experiment_id"] for r in sort_rows(rows, "val.spearman")] == ["b", "a", "c"]
    with pytest.raises(UsageError, match="use NAME"):
        sort_rows(rows, "train.x.y")


@pytest.mark.redis
def test_sweep_submit_puts_the_grid_on_the_queue(demo_workdir, redis_server):  # noqa: F811
    args = ["run", "plans/demo.json", "--sweep", "train.lr=0.01,0.001", "--submit", "--redis", redis_server, "--json"]
    result = cli(*args, workdir=demo_workdir)
    assert result.returncode == 0, result.stderr
    docs = json.loads(result.stdout)["experiments"]
    assert [d["values"] for d in docs] == [{"train.lr": 0.01}, {"train.lr": 0.001}]
    assert len({d["job_id"] for d in docs}) == 2 and not any(d["duplicate"] for d in docs)
    again = json.loads(cli(*args, workdir=demo_workdir).stdout)["experiments"]
    assert [d["job_id"] for d in again] == [d["job_id"] for d in docs] and all(d["duplicate"] for d in again)
