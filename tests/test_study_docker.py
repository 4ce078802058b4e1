"""Studies on the real Docker engine: one slot container runs many points (run as a non-root user).

A slot container cannot be given new mounts, so each point's output folders are moved into the
slot's points folder while it runs and back after (runner.run.slots); these tests check what comes
back, including when the plugin code tries to swap a folder for a link.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.e2e import REPO, chown_to, infra_as, labelled_containers, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.slow]

SWAPPER = """
import os
from runner.core.experiment import current_run
from runner.core.models import LinearModel, register_model


@register_model("swapper")
class Swapper(LinearModel):
    # plugin code that replaces its experiment's artifacts folder with a link to the host's /etc
    def __init__(self, seq_len, in_dim, n_outputs=1, **kw):
        super().__init__(seq_len, in_dim, n_outputs, **kw)
        root = current_run().exp_dir
        os.rename(root / "artifacts", root / "artifacts.moved")
        os.symlink("/etc", root / "artifacts")
"""


def small_plan(workdir: Path, run_user, name: str = "study", model: dict | None = None) -> str:
    doc = {
        "name": name,
        "data": {"db": "data/blat_ecolx.db", "limit": 400},
        "model": model or {"name": "ridge"},
        "train": {"max_epochs": 2, "batch_size": 64},
        "resources": {"cpus": 1},
    }
    path = workdir / "plans" / f"{name}.json"
    path.write_text(json.dumps(doc))
    chown_to(run_user, path)
    return f"plans/{name}.json"


def test_a_study_runs_its_points_in_one_container(base_image, workdir, run_user, docker_client):
    plan = small_plan(workdir, run_user)
    models = '[{"name":"ridge"},{"name":"linear"},{"name":"mlp"}]'
    result = infra_as(run_user, "run", plan, "--json", "--sweep", f"model={models}", "--sweep", "train.seed=0,1",
                      workdir=workdir)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    points = doc["experiments"]
    assert [p["state"] for p in points] == ["succeeded"] * 6
    records = [json.loads((Path(p["exp_dir"]) / "status.json").read_text()) for p in points]
    assert len({r["container_id"] for r in records}) == 1  # one start-up for the six points
    assert len({r["slot"]["name"] for r in records}) == 1
    uid, gid, _ = run_user
    for p in points:
        exp = Path(p["exp_dir"])
        for rel in ("metrics/metrics.json", "ckpts/best.ckpt", "artifacts/model.pth", "container.log"):
            assert (exp / rel).is_file(), (exp, rel)
        log = (exp / "container.log").read_text()
        assert "@@infra-slot" not in log and "infra-train: done" in log
        assert all((f.lstat().st_uid, f.lstat().st_gid) == (uid, gid) for f in [exp, *exp.rglob("*")])
    # the ridge fit is computed once per seed's data and split, and reused by linear and mlp
    logs = [(Path(p["exp_dir"]) / "container.log").read_text() for p in points]
    assert sum("closed-form fit reused" in text for text in logs) >= 4
    assert labelled_containers(docker_client, workdir) == []
    assert list((workdir / "experiments" / ".slots").iterdir()) == []

    again = infra_as(run_user, "run", plan, "--json", "--sweep", f"model={models}", "--sweep", "train.seed=0,1",
                     workdir=workdir)  # fmt: skip
    assert again.returncode == 0 and all(p["reused"] for p in json.loads(again.stdout)["experiments"])


def test_a_folder_swapped_for_a_link_is_refused(base_image, workdir, run_user):
    (workdir / "model" / "swapper.py").write_text(SWAPPER)
    chown_to(run_user, workdir / "model" / "swapper.py")
    plan = small_plan(workdir, run_user, "swap")
    models = '[{"name":"swapper"},{"name":"ridge"}]'
    result = infra_as(run_user, "run", plan, "--json", "--sweep", f"model={models}", workdir=workdir)
    assert result.returncode == 1, result.stderr[-3000:]
    bad, good = json.loads(result.stdout)["experiments"]
    assert bad["state"] == "failed"
    assert "left artifacts as something other than a folder; refused" in bad["message"]
    artifacts = Path(bad["exp_dir"]) / "artifacts"
    assert artifacts.is_dir() and not artifacts.is_symlink() and list(artifacts.iterdir()) == []
    assert good["state"] == "succeeded"  # the next point in the same slot is not affected


def test_stop_one_point_of_a_docker_study(base_image, workdir, run_user):
    shutil.copy(REPO / "tests" / "gate_model.py", workdir / "model" / "gate.py")
    chown_to(run_user, workdir / "model" / "gate.py")
    plan = small_plan(workdir, run_user, "gated", {"name": "gate", "params": {}})
    doc = json.loads((workdir / plan).read_text())
    doc["train"].update(max_epochs=3, early_stopping_patience=0)
    (workdir / plan).write_text(json.dumps(doc))
    runner = infra_as(run_user, "run", plan, "--json", "--sweep", "train.seed=0,1", workdir=workdir, background=True)
    try:
        # while a point runs, its output folders are in the slot's points folder
        waiting = wait_for(lambda: list((workdir / "experiments" / ".slots").glob("*/points/*/metrics/.gate-waiting"))
                           if (workdir / "experiments" / ".slots").exists() else None, 300, "point 1 at its gate")  # fmt: skip
        first = waiting[0].parent.parent.name
        stopped = infra_as(run_user, "stop", first, "--json", workdir=workdir)
        assert stopped.returncode == 0, stopped.stderr[-2000:]
        assert json.loads(stopped.stdout)["state"] == "cancelled"
        second = wait_for(lambda: [p for p in (workdir / "experiments" / ".slots").glob("*/points/*/metrics/.gate-waiting")
                                   if p.parent.parent.name != first], 300, "point 2 at its gate")  # fmt: skip
        second[0].with_name(".gate-open").touch()
        out, err = runner.communicate(timeout=600)
        assert runner.returncode == 1, err[-3000:]
    finally:
        if runner.poll() is None:
            runner.kill()
    states = {p["experiment_id"]: p["state"] for p in json.loads(out)["experiments"]}
    assert states[first] == "cancelled" and sorted(states.values()) == ["cancelled", "succeeded"]
    assert (workdir / "experiments" / first / "ckpts" / "last.ckpt").is_file()  # given back, with its checkpoint


def test_a_study_run_by_root_trains_as_the_unprivileged_user(base_image, tmp_path):
    """As the quick start runs it (root): the slot container runs as the node's training uid, so each
    point's folders must be that uid's while they are in the slot (found by bench_study.py as root)."""
    import os

    from runner.data.importer import build_demo_db
    from tests.e2e import BASE_ENV
    from tests.helpers import infra

    if os.geteuid() != 0:
        pytest.skip("the root case needs root (CI runs as root)")
    work = tmp_path / "work"
    shutil.copytree(REPO / "plugins_template", work)
    build_demo_db(work / "data" / "blat_ecolx.db")
    plan = work / "plans" / "small.json"
    plan.write_text(json.dumps({"name": "root", "data": {"db": "data/blat_ecolx.db", "limit": 300},
                                "model": {"name": "linear"}, "train": {"max_epochs": 1}}))  # fmt: skip
    result = infra("run", str(plan), "--json", "--sweep", "train.seed=0,1", workdir=work, env=BASE_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    points = json.loads(result.stdout)["experiments"]
    assert [p["state"] for p in points] == ["succeeded", "succeeded"]
    for p in points:
        exp = Path(p["exp_dir"])
        assert (exp / "artifacts" / "model.pth").is_file()
        assert (exp / "status.json").stat().st_uid == 0  # the host's record stays root's
        assert (exp / "metrics").stat().st_uid == 10001  # the training's folders, the training user's
