"""MLflow tracking from the host and the standard Lightning loggers, against a real `mlflow server`.

The server is the real one (SQLite backend store, artifacts proxied to a local folder) on loopback,
started by the fixture; runs are real trainings (a container, or the local backend for the paths
that do not depend on where the training runs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e import _free_port, infra_as
from tests.helpers import cli, infra

try:
    import mlflow
except ImportError:  # in CI (CI=true) the dev extra must have installed it: fail, never skip
    if os.environ.get("CI"):
        raise
    pytest.skip("needs mlflow (the dev extra): pip install -e '.[core,dev]'", allow_module_level=True)

PLAN = {
    "name": "tracked",
    "data": {"db": "data/blat_ecolx.db", "limit": 600},
    "model": {"name": "linear"},
    "train": {"max_epochs": 2, "batch_size": 128, "early_stopping_patience": 0},
}


@pytest.fixture(scope="module")
def mlflow_server():
    """A real `mlflow server` on a free loopback port: its URI; stopped (its process group) at the end."""
    top = Path(tempfile.mkdtemp(prefix="infra-mlflow-", dir="/tmp"))
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = (top / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{top}/mlflow.db",
            "--artifacts-destination",
            str(top / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],  # fmt: skip
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=top,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180  # the first start creates the database (migrations)
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not come up: {(top / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.rmtree(top, ignore_errors=True)


def allow(monkeypatch, *uris: str) -> None:
    """List the servers of `uris` in the node's tracking_hosts (infra logs to no other server)."""
    # an http:// server is listed with its scheme (a plain entry allows https only)
    monkeypatch.setenv("INFRA_TRACKING_HOSTS", ",".join(uri if uri.startswith("http://") else uri.split("://", 1)[1]
                                                        for uri in uris))  # fmt: skip


def write_plan(workdir: Path, name: str, **sections) -> Path:
    plan = {**PLAN, **sections}
    path = workdir / "plans" / f"{name}.json"
    path.write_text(json.dumps(plan))
    return path


def local_workdir(tmp_path: Path) -> Path:
    """A workdir with plans/ and the bundled BLAT database, for the local backend."""
    from runner.data.importer import build_demo_db

    work = tmp_path / "work"
    for sub in ("plans", "data"):
        (work / sub).mkdir(parents=True)
    build_demo_db(work / "data" / "blat_ecolx.db")
    return work


def host_events(exp_dir: Path, kind: str) -> list[dict]:
    lines = (exp_dir / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def runs_of(uri: str, experiment: str) -> list:
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


@pytest.mark.docker
@pytest.mark.slow
def test_docker_study_points_are_logged_live_from_the_slots_folders(
    mlflow_server, base_image, workdir, run_user, monkeypatch
):
    """A docker study slot keeps a point's output folders in its own folder while the point runs; the
    live client reads the plan and the epochs there (it found nothing in the experiment before).

    Each point is held at the gate after its first epoch until its live run exists: a point that ends
    before the live client is ready is logged once at its end (no `tracking_started`), which is right,
    but is not what this test is about, and on a loaded machine a 2-second point does that."""
    from tests.e2e import add_gate_model, chown_to, wait_for

    allow(monkeypatch, mlflow_server)
    add_gate_model(workdir, run_user)
    plan = write_plan(workdir, "swept", model={"name": "gate", "params": {"after_checkpoint": True}},
                      tracking={"mlflow_uri": mlflow_server, "experiment": "infra-docker-study"})  # fmt: skip
    os.chown(plan, run_user[0], run_user[1])
    args = ("run", str(plan), "--json", "--sweep", "train.seed=11,12")
    runner = infra_as(run_user, *args, workdir=workdir, background=True)
    slots = workdir / "experiments" / ".slots"
    opened: set[str] = set()
    try:
        for n in (1, 2):  # one slot: the points one after the other, each in the slot's points folder
            (waiting,) = wait_for(lambda: [w for w in slots.glob("*/points/*/metrics/.gate-waiting")
                                           if w.parent.parent.name not in opened] if slots.exists() else None,
                                  300, f"point {n} at its gate")  # fmt: skip
            point = waiting.parent.parent.name
            exp_dir = workdir / "experiments" / point
            wait_for(lambda exp_dir=exp_dir: host_events(exp_dir, "tracking_started"), 300,
                     f"point {n}'s live MLflow run")  # fmt: skip
            gate = waiting.with_name(".gate-open")
            gate.touch()
            chown_to(run_user, gate)
            opened.add(point)
        out, err = runner.communicate(timeout=600)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 0, err[-3000:]
    points = json.loads(out)["experiments"]
    assert len(points) == 2 and {p["experiment_id"] for p in points} == opened
    for point in points:
        exp_dir = Path(point["exp_dir"])
        (started,) = host_events(exp_dir, "tracking_started")  # the live run, made while the point ran
        (tracked,) = host_events(exp_dir, "tracked")
        assert tracked["run_id"] == started["run_id"]
        assert not host_events(exp_dir, "tracking_live_stopped")  # the folders moving back is no tampering
    assert {r.info.status for r in runs_of(mlflow_server, "infra-docker-study")} == {"FINISHED"}


@pytest.mark.docker
@pytest.mark.slow
def test_container_run_is_tracked_and_logs_csv_and_tensorboard(
    mlflow_server, base_image, workdir, run_user, monkeypatch
):
    allow(monkeypatch, mlflow_server)
    plan = write_plan(workdir, "tracked", tracking={"mlflow_uri": mlflow_server, "experiment": "infra-tests"})
    os.chown(plan, run_user[0], run_user[1])
    result = infra_as(run_user, "run", str(plan), "--json", workdir=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    exp_dir = Path(doc["exp_dir"])

    (run,) = runs_of(mlflow_server, "infra-tests")
    client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_server)
    assert run.info.status == "FINISHED" and run.info.run_name == doc["experiment_id"]
    assert run.data.tags["infra.state"] == "succeeded" and run.data.tags["infra.experiment_id"] == doc["experiment_id"]
    params = run.data.params
    assert params["model.name"] == "linear" and params["train.max_epochs"] == "2"
    assert params["infra.experiment_id"] == doc["experiment_id"] and params["infra.image"] == doc["image"]
    assert "tracking.mlflow_uri" not in params
    for name in ("train_loss", "val_loss", "val_spearman", "val_pearson"):
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == [0, 1], name
    metrics = json.loads((exp_dir / "metrics" / "metrics.json").read_text())
    assert run.data.metrics["test_spearman"] == pytest.approx(metrics["test"]["spearman"])
    assert run.data.metrics["best_val_spearman"] == pytest.approx(metrics["val"]["spearman"])
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/learning_curves.png", "plots/predicted_vs_measured.png", "plots/single_mutants.png"} <= plots
    assert "plots/per_mut_num.png" not in plots  # BLAT holds single mutants only: one level, no plot
    (event,) = host_events(exp_dir, "tracked")
    assert event["run_id"] == run.info.run_id and event["mlflow_uri"] == mlflow_server

    # the standard loggers, written by the training in the container
    csv_lines = (exp_dir / "logs" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].split(",") == ["epoch", "step", "train_loss", "val_loss", "val_spearman"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # the epochs' file, and the kept model's values logged after the trainer closed it: a second file of
    # the same run, with its own suffix (the image's tensorboardX names files by second and host only: a
    # second file without one, written within the second, replaced the epochs'). TensorBoard reads both.
    events_dir = exp_dir / "logs" / "tensorboard" / "version_0"
    files = sorted(p.name for p in events_dir.glob("events.out.tfevents.*"))
    assert len(files) == 2 and files[1].endswith(".kept") and not files[0].endswith(".kept"), files
    board = EventAccumulator(str(events_dir))
    board.Reload()
    assert {"train_loss", "val_loss", "val_spearman", "kept/val_spearman"} <= set(board.Tags()["scalars"])
    (kept,) = board.Scalars("kept/val_spearman")
    assert kept.value == pytest.approx(metrics["val"]["spearman"], abs=1e-6)
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    # `tensorboard --logdir <workdir>/experiments/` finds the run, named by its path
    runs = EventMultiplexer().AddRunsFromDirectory(str(workdir / "experiments"))
    runs.Reload()
    assert f"{doc['experiment_id']}/logs/tensorboard/version_0" in runs.Runs()
    spearman = [e.value for e in board.Scalars("val_spearman")]
    epochs = [json.loads(line) for line in (exp_dir / "metrics" / "metrics.jsonl").read_text().splitlines()]
    # a fitted start (linear starts at the ridge fit) is scored before the first step, at step 0
    start = [metrics["start"]["val_spearman"]] if "start" in metrics else []
    assert spearman == pytest.approx(start + [e["val_spearman"] for e in epochs])
    # the host progress events are unchanged by the loggers
    assert [e["epoch"] for e in map(json.loads, (exp_dir / "logs/events.jsonl").read_text().splitlines())
            if e["event"] == "epoch"] == [0, 1]  # fmt: skip


@pytest.mark.core
@pytest.mark.slow
def test_detached_run_is_tracked_once_by_whoever_finalises_it(mlflow_server, tmp_path, monkeypatch):
    allow(monkeypatch, mlflow_server)
    work = local_workdir(tmp_path)
    plan = write_plan(work, "detached", tracking={"mlflow_uri": mlflow_server, "experiment": "infra-detached"})
    started = infra("run", str(plan), "--backend", "local", "--detach", "--json", workdir=work)
    assert started.returncode == 0, started.stderr[-2000:]
    exp_id = json.loads(started.stdout)["experiment_id"]
    exp_dir = work / "experiments" / exp_id
    pid = json.loads((exp_dir / "status.json").read_text())["pid"]

    deadline = time.monotonic() + 600
    while os.path.exists(f"/proc/{pid}"):  # the training's wrapper process: gone once it has finished
        assert time.monotonic() < deadline, "the detached training did not finish"
        time.sleep(0.5)
    assert not host_events(exp_dir, "tracked")  # nobody has looked at it yet
    # two readers see the finished run; exactly one finalises and logs it
    first = cli("status", exp_id, "--json", workdir=work)
    second = cli("ls", "--json", workdir=work)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert json.loads(first.stdout)["state"] == "succeeded"
    (run,) = runs_of(mlflow_server, "infra-detached")
    assert run.data.tags["infra.experiment_id"] == exp_id and run.data.metrics["test_spearman"] > 0
    assert len(host_events(exp_dir, "tracked")) == 1


@pytest.mark.core
@pytest.mark.slow
def test_unreachable_server_warns_and_the_run_still_succeeds(tmp_path, mlflow_server, monkeypatch):
    work = local_workdir(tmp_path)
    closed = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    allow(monkeypatch, closed)  # `infra track --mlflow-uri` below needs no listing: the invoker chose it
    plan = write_plan(work, "unreachable", tracking={"mlflow_uri": closed})
    t0 = time.monotonic()
    result = infra("run", str(plan), "--backend", "local", "--json", workdir=work)
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(result.stdout)
    assert doc["state"] == "succeeded" and doc["exit_code"] == 0
    warnings = [line for line in result.stderr.splitlines() if "not logged to MLflow" in line]
    assert len(warnings) == 1 and closed in warnings[0], result.stderr[-2000:]
    (event,) = host_events(Path(doc["exp_dir"]), "tracking_failed")
    assert event["mlflow_uri"] == closed and "Connection" in event["error"]
    assert not host_events(Path(doc["exp_dir"]), "tracked")
    assert time.monotonic() - t0 < 300

    # `infra track` logs it later; its own failures are errors
    exp_id = doc["experiment_id"]
    again = cli("track", exp_id, workdir=work)
    assert again.returncode == 3 and f"not logged to MLflow at {closed}" in again.stderr, again.stderr
    tracked = cli("track", exp_id, "--mlflow-uri", mlflow_server, "--experiment", "infra-later", "--json",
                    workdir=work)  # fmt: skip
    assert tracked.returncode == 0, tracked.stderr
    (run,) = runs_of(mlflow_server, "infra-later")
    assert json.loads(tracked.stdout)["run_id"] == run.info.run_id
    assert run.data.tags["infra.experiment_id"] == exp_id and "test_spearman" in run.data.metrics
    bad = cli("track", exp_id, "--mlflow-uri", "https://user:secret@mlflow.lab", workdir=work)
    assert bad.returncode == 2 and "--mlflow-uri" in bad.stderr and "secret" not in bad.stderr


def test_tampered_plan_is_not_trusted_for_tracking(tmp_path):
    from runner.run.records import Experiment, plan_sha256
    from runner.run.tracking import track_finished

    exp = Experiment(tmp_path / "experiments" / "x-1")
    exp.make_layout()
    plan = {**PLAN, "experiment_id": "x-1", "data": {**PLAN["data"], "db": "/data/blat_ecolx.db"},
            "tracking": {"mlflow_uri": "http://127.0.0.1:9"}}  # fmt: skip
    host_plan = {**plan, "data": {**plan["data"], "db": "/host/blat_ecolx.db"}}
    record = {"experiment_id": "x-1", "state": "succeeded", "attempt": 1, "backend": "docker",
              "plan_sha256": plan_sha256(host_plan), "db": "/host/blat_ecolx.db"}  # fmt: skip
    exp.write(dict(record))
    # the training rewrote its copy to send the results elsewhere
    evil = {**plan, "tracking": {"mlflow_uri": "http://attacker.example"}}
    (exp.root / "config" / "plan.json").write_text(json.dumps(evil))
    assert track_finished(exp, record) is None
    (event,) = host_events(exp.root, "tracking_failed")
    assert "differs from the plan infra wrote" in event["error"] and "attacker" not in json.dumps(event)


def test_plan_tracking_section_is_validated(tmp_path, mini_db):
    base = {"name": "p", "data": {"db": str(mini_db)}, "model": {"name": "linear"}}
    for tracking, message in (
        ({"mlflow_uri": "https://user:secret@mlflow.lab/"}, "tracking.mlflow_uri"),
        ({"mlflow_uri": "file:///etc"}, "tracking.mlflow_uri"),
        ({"experiment": "x"}, "tracking.mlflow_uri"),
        ({"mlflow_uri": "http://mlflow.lab", "run": "x"}, "tracking.run"),
    ):
        path = tmp_path / "plan.json"
        path.write_text(json.dumps({**base, "tracking": tracking}))
        result = cli("validate", str(path))
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "secret" not in result.stderr
    path.write_text(json.dumps({**base, "tracking": {"mlflow_uri": "http://mlflow.lab:5000/x", "experiment": "a b"}}))
    assert cli("validate", str(path)).returncode == 0


def test_tracking_is_not_part_of_the_experiment_id(tmp_path, mini_db):
    base = {"name": "p", "data": {"db": str(mini_db)}, "model": {"name": "linear"}}
    ids = set()
    for tracking in (None, {"mlflow_uri": "http://a:5000"}, {"mlflow_uri": "http://b", "experiment": "e"}):
        path = tmp_path / "plan.json"
        path.write_text(json.dumps({**base, **({"tracking": tracking} if tracking else {})}))
        result = cli("run", str(path), "--backend", "local", "--dry-run", "--json", workdir=tmp_path)
        assert result.returncode == 0, result.stderr
        ids.add(json.loads(result.stdout)["experiment_id"])
    assert len(ids) == 1


def test_missing_mlflow_client_is_exit_3_when_the_run_starts(tmp_path, mini_db):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"name": "p", "data": {"db": str(mini_db)}, "model": {"name": "linear"},
                                "tracking": {"mlflow_uri": "http://mlflow.lab"}}))  # fmt: skip
    # this host's Python without the mlflow package (a None entry makes the import system refuse it)
    code = "import sys; sys.modules['mlflow'] = None; from runner.cli import main; main()"

    def without_client(*args):
        return subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120
        )

    # validating (or submitting, on a Master that never logs) needs no client: the run's host logs
    assert without_client("validate", str(path)).returncode == 0
    result = without_client("run", str(path), "--backend", "local", "--workdir", str(tmp_path))
    assert result.returncode == 3, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("infra: error:")]
    assert "pip install 'infra[tracking]'" in line and str(path) in line
    assert not (tmp_path / "experiments").exists() or not any((tmp_path / "experiments").iterdir())
