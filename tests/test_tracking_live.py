"""Live MLflow logging from the host that follows a run, read back through a real `mlflow server`'s REST API.

The server is test_tracking's fixture (a real `mlflow server` on loopback). Trainings are real
(`--backend local`); the one held mid-training is the gate model (tests/gate_model.py), held after its
first epoch until the test opens the gate, so the checks during the run never race the training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests import test_tracking
from tests.helpers import cli, gate_workdir, infra_background
from tests.test_attack_tracking import Listener
from tests.test_tracking import allow, host_events, local_workdir, write_plan

mlflow_server = test_tracking.mlflow_server  # the same fixture: a real `mlflow server` on loopback, per module

LIVE_PLAN = {
    "name": "live",
    "data": {"db": "data/blat.db", "limit": 600},
    "model": {"name": "gate"},
    "train": {"max_epochs": 3, "batch_size": 128, "early_stopping_patience": 0},
}
ARTIFACTS = {
    "config/plan.json",
    "metrics/metrics.json",
    "metrics/metrics.jsonl",
    "predictions/predictions.parquet",
    "logs/train.log",
    "logs/container.log",
}


def rest(uri: str, endpoint: str, **query) -> dict:
    """GET one of the tracking server's REST endpoints (`/api/2.0/mlflow/...`)."""
    with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}", timeout=30) as r:
        return json.loads(r.read())


def search(uri: str, experiment_id: str) -> list[dict]:
    """The runs of an experiment (`runs/search` is a POST)."""
    body = json.dumps({"experiment_ids": [experiment_id]}).encode()
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/runs/search", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read()).get("runs", [])


def history(uri: str, run_id: str, key: str) -> list[dict]:
    return rest(uri, "metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])


def artifacts(uri: str, run_id: str, path: str = "") -> set[str]:
    """Every file of the run's artifacts, listed folder by folder through the REST API."""
    out = set()
    for entry in rest(uri, "artifacts/list", run_id=run_id, path=path).get("files", []):
        out |= artifacts(uri, run_id, entry["path"]) if entry["is_dir"] else {entry["path"]}
    return out


def tags_of(data: dict) -> dict:
    return {t["key"]: t["value"] for t in data["tags"]}


def ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def until(condition, what: str, timeout: float = 300):
    """Wait for `condition()` to be truthy: the live client logs on its own schedule (a guard, not a measure)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"not seen within {timeout} s: {what}"
        time.sleep(0.2)
    return value


def held_run(tmp_path: Path, tracking: dict):
    """`infra run` of the gate plan in its own process, held after its first epoch: (process, exp dir, log)."""
    work = gate_workdir(tmp_path / "work")
    plan = work / "plans" / "live.json"
    plan.parent.mkdir(exist_ok=True)
    plan.write_text(json.dumps({**LIVE_PLAN, "tracking": tracking}))
    out = tmp_path / "run.log"
    proc = infra_background("run", str(plan), "--backend", "local", workdir=work, log=out)
    waiting = until(lambda: next((work / "experiments").glob("*/metrics/.gate-waiting"), None), "the gate", 900)
    return proc, waiting.parent.parent, out


@pytest.mark.core
@pytest.mark.slow
def test_a_running_attempt_is_live_in_mlflow_and_its_run_ends_with_true_times_and_files(
    mlflow_server, tmp_path, monkeypatch
):
    allow(monkeypatch, mlflow_server)
    proc, exp_dir, out = held_run(tmp_path, {"mlflow_uri": mlflow_server, "experiment": "infra-live"})
    try:
        # held after epoch 0: the run is on the server, RUNNING, with that epoch's metrics
        (started,) = until(lambda: host_events(exp_dir, "tracking_started"), "the live run's event")
        run_id = started["run_id"]
        until(lambda: history(mlflow_server, run_id, "val_loss"), "epoch 0's val_loss, live")
        info = rest(mlflow_server, "runs/get", run_id=run_id)["run"]["info"]
        assert info["status"] == "RUNNING" and "end_time" not in info
        assert [m["step"] for m in history(mlflow_server, run_id, "train_loss")] == [0]
    finally:
        (exp_dir / "metrics" / ".gate-open").touch()
    assert proc.wait(600) == 0, out.read_text()[-3000:]
    record = json.loads((exp_dir / "status.json").read_text())

    run = rest(mlflow_server, "runs/get", run_id=run_id)["run"]
    info, data = run["info"], run["data"]
    assert info["status"] == "FINISHED"
    # the attempt's own times, not the logging's
    assert abs(int(info["start_time"]) - ms(record["started_at"])) <= 2000
    assert abs(int(info["end_time"]) - ms(record["finished_at"])) <= 2000
    assert int(info["end_time"]) - int(info["start_time"]) >= 1000  # the held run took seconds, not a blink
    params = {p["key"]: p["value"] for p in data["params"]}
    db = Path(record["db"])
    assert params["data.db"] == str(db) and db.is_absolute()
    # hashed by the host when the attempt started (the record's), not by whoever finalised it
    assert params["data.db_sha256"] == record["db_sha256"] == hashlib.sha256(db.read_bytes()).hexdigest()
    assert tags_of(data)["infra.artifacts_logged"] == "yes"
    tags = {t["key"]: t["value"] for t in data["tags"]}
    assert tags["infra.state"] == "succeeded" and tags["infra.experiment_id"] == record["experiment_id"]
    assert tags["infra.model_logged"].startswith("no: model 'gate' is a workdir plugin")
    assert sorted(m["step"] for m in history(mlflow_server, run_id, "val_loss")) == [0, 1, 2]  # each epoch once
    assert "test_spearman" in {m["key"] for m in data["metrics"]}
    assert artifacts(mlflow_server, run_id) >= ARTIFACTS
    # one MLflow run for the attempt (the live one, finished), and the URL said at the end
    experiment = rest(mlflow_server, "experiments/get-by-name", experiment_name="infra-live")["experiment"]
    assert [r["info"]["run_id"] for r in search(mlflow_server, experiment["experiment_id"])] == [run_id]
    (tracked,) = host_events(exp_dir, "tracked")
    url = f"{mlflow_server}/#/experiments/{experiment['experiment_id']}/runs/{run_id}"
    assert tracked["run_id"] == run_id and tracked["url"] == url
    assert f"MLflow run: {url}" in out.read_text()


@pytest.mark.core
@pytest.mark.slow
def test_a_hanging_server_during_the_run_costs_the_deadline_after_it_and_changes_nothing(tmp_path, monkeypatch):
    """A listed server that answers one byte every 0.2 s forever: the live client hangs on its first
    request while the run trains; the run still ends (succeeded), and the end waits for the client
    `tracking_timeout` (3 s) and no more, then reports it."""
    drip = Listener(drip=0.2)
    try:
        monkeypatch.setenv("INFRA_TRACKING_HOSTS", f"http://127.0.0.1:{drip.port}")
        monkeypatch.setenv("INFRA_TRACKING_TIMEOUT", "3")
        proc, exp_dir, out = held_run(tmp_path, {"mlflow_uri": drip.uri})
        try:
            until(lambda: drip.heads, "the live client's first request")  # it is hanging on it now
        finally:
            (exp_dir / "metrics" / ".gate-open").touch()
        opened = time.monotonic()
        assert proc.wait(600) == 0, out.read_text()[-3000:]
        record = json.loads((exp_dir / "status.json").read_text())
        assert record["state"] == "succeeded" and record["exit_code"] == 0
        (failed,) = host_events(exp_dir, "tracking_failed")
        assert "gave up after 3 s (tracking_timeout)" in failed["error"]
        assert not host_events(exp_dir, "tracked")
        # two epochs of a linear model and the deadline: a guard against waiting on the server, not a speed test
        assert time.monotonic() - opened < 120
    finally:
        drip.close()


@pytest.mark.core
@pytest.mark.slow
def test_the_logged_model_predicts_what_infra_predicts(mlflow_server, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd

    allow(monkeypatch, mlflow_server)
    work = local_workdir(tmp_path)
    plan = write_plan(work, "modelled", tracking={"mlflow_uri": mlflow_server, "experiment": "infra-model"})
    result = cli("run", str(plan), "--backend", "local", "--json", workdir=work)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    (tracked,) = host_events(Path(doc["exp_dir"]), "tracked")
    assert doc["mlflow_run_url"] == tracked["url"] and f"MLflow run: {tracked['url']}" in result.stderr
    run = rest(mlflow_server, "runs/get", run_id=tracked["run_id"])["run"]
    assert {t["key"]: t["value"] for t in run["data"]["tags"]}["infra.model_logged"] == "yes"
    assert "model/MLmodel" in artifacts(mlflow_server, tracked["run_id"])

    mutants = ["H24A", "F6Y", "R7K:V8I", "", "E64K"]  # the last: a wrong wild type (an error row)
    inputs = tmp_path / "mutants.csv"
    inputs.write_text("mutant\n" + "\n".join(f'"{m}"' for m in mutants) + "\n")
    predicted = cli("predict", doc["experiment_id"], str(inputs), "--out", str(tmp_path / "p.csv"),
                    "--backend", "local", workdir=work)  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    table = pd.read_csv(tmp_path / "p.csv", keep_default_na=False, dtype=str)
    expected = [float(x) if x else float("nan") for x in table["prediction"]]
    assert sum(x == x for x in expected) >= 3, table.to_string()  # most rows predicted: the comparison means something

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server)
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{tracked['run_id']}/model")
    finally:
        mlflow.set_tracking_uri(previous)
    got = model.predict(pd.DataFrame({"mutant": mutants}))
    assert got["prediction"].tolist() == pytest.approx(expected, rel=1e-6, nan_ok=True)


def test_a_live_run_whose_follower_went_away_is_finished_post_hoc_not_duplicated(tmp_path, mlflow_server, monkeypatch):
    """A follower that went away (a killed `infra run`, a study slot that died) leaves its live run
    RUNNING with the run id in a `tracking_started` event: whoever finalises the attempt later logs
    into that run (no second run), with the attempt's true times."""
    from mlflow.tracking import MlflowClient

    from runner.run.records import Experiment, plan_sha256
    from runner.run.tracking import track_finished

    allow(monkeypatch, mlflow_server)
    exp = Experiment(tmp_path / "experiments" / "x-1")
    exp.make_layout()
    plan = {"name": "orphan", "experiment_id": "x-1", "data": {"db": "/data/blat.db"}, "model": {"name": "linear"},
            "tracking": {"mlflow_uri": mlflow_server, "experiment": "infra-orphan"}}  # fmt: skip
    db = tmp_path / "blat.db"
    db.write_bytes(b"not really a database, but a file with a hash")
    record = {"experiment_id": "x-1", "state": "succeeded", "attempt": 1, "backend": "local",
              "plan_sha256": plan_sha256({**plan, "data": {"db": str(db)}}), "db": str(db),
              "db_sha256": hashlib.sha256(db.read_bytes()).hexdigest(),  # as `launch.open_attempt` writes it
              "started_at": "2026-12-06T05:13:37.570Z", "finished_at": "2026-12-06T05:14:20.125Z"}  # fmt: skip
    exp.write(dict(record))
    (exp.root / "config" / "plan.json").write_text(json.dumps(plan))
    (exp.root / "metrics" / "metrics.jsonl").write_text(
        "".join(json.dumps({"epoch": e, "train_loss": 1.0 / (e + 1)}) + "\n" for e in range(3))
    )
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment_id = client.create_experiment("infra-orphan")
    live = client.create_run(experiment_id, start_time=ms(record["started_at"]))
    client.log_metric(live.info.run_id, "train_loss", 1.0, step=0)  # what the live client had logged
    exp.event("tracking_started", attempt=1, mlflow_uri=mlflow_server, run_id=live.info.run_id)

    assert track_finished(exp, record) == live.info.run_id
    run = client.get_run(live.info.run_id)
    assert run.info.status == "FINISHED" and run.info.end_time == ms(record["finished_at"])
    assert run.info.start_time == ms(record["started_at"])
    assert sorted(m.step for m in client.get_metric_history(live.info.run_id, "train_loss")) == [0, 1, 2]
    assert run.data.params["data.db_sha256"] == hashlib.sha256(db.read_bytes()).hexdigest()
    assert run.data.params["data.db"] == str(db) and run.data.params["data.db_in_run"] == "/data/blat.db"
    assert run.data.tags["infra.model_logged"] == "no: the experiment has no config/predict.json or checkpoint"
    assert len(client.search_runs([experiment_id])) == 1


def test_artifacts_over_their_cap_or_not_regular_are_skipped_and_named(tmp_path, monkeypatch):
    """The training writes what it likes into its folders: a link is never followed, a file over the
    cap is not copied (the run still logs, the tag names what was left out)."""
    from runner.run import tracking
    from runner.run.records import Experiment

    exp = Experiment(tmp_path / "experiments" / "x-1")
    exp.make_layout()
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    (exp.root / "logs" / "train.log").symlink_to(secret)
    (exp.root / "metrics" / "metrics.json").write_text("{}")
    (exp.root / "artifacts" / "predictions.csv").write_text("x" * 100)
    monkeypatch.setattr(tracking, "ARTIFACT_FILES", (*tracking.ARTIFACT_FILES[:4], ("artifacts/predictions.csv",
                        "predictions", 10), *tracking.ARTIFACT_FILES[5:]))  # fmt: skip
    skipped: list[str] = []
    files = [[str(copy.relative_to(tmp_path / "out")), folder]
             for copy, folder in tracking.each_artifact(exp, tmp_path / "out", skipped)]  # fmt: skip
    assert files == [["metrics/metrics.json", "metrics"]]
    assert any("logs/train.log" in s for s in skipped) and any("predictions.csv" in s for s in skipped)
    assert not (tmp_path / "out" / "logs" / "train.log").exists()
    assert not (tmp_path / "out" / "predictions" / "predictions.csv").exists()


def test_the_model_wrapper_lists_its_files_without_being_imported():
    from runner.run.tracking import MODEL_CODE, model_files

    assert MODEL_CODE.exists()
    files = model_files()
    assert files is not None and "config/predict.json" in files and "ckpts/best.ckpt" in files


def test_live_logging_never_delays_the_follower_when_nothing_is_allowed(tmp_path, caplog):
    """`begin` returns at once and starts nothing for an experiment whose server is not listed."""
    from runner.run import tracking_live
    from runner.run.records import Experiment, plan_sha256

    exp = Experiment(tmp_path / "experiments" / "x-1")
    exp.make_layout()
    plan = {"name": "p", "experiment_id": "x-1", "data": {"db": "/d.db"}, "model": {"name": "linear"},
            "tracking": {"mlflow_uri": "http://127.0.0.1:9"}}  # fmt: skip
    (exp.root / "config" / "plan.json").write_text(json.dumps(plan))
    record = {"experiment_id": "x-1", "state": "running", "attempt": 1, "plan_sha256": plan_sha256(plan),
              "db": "/d.db", "started_at": "2026-12-06T05:13:37.570Z"}  # fmt: skip
    done = threading.Event()
    caplog.set_level(logging.INFO, logger="runner.run.tracking_live")
    threading.Thread(target=lambda: (tracking_live.begin(exp, record), done.set()), daemon=True).start()
    assert done.wait(30)
    assert tracking_live.take(exp, record) is None
    # for that reason, and no other (a client that failed to start would say otherwise)
    assert "127.0.0.1:9 is not in this node's tracking_hosts (none)" in caplog.text
    assert not (exp.root / ".tracking-live-1").exists()


@pytest.mark.core
@pytest.mark.slow
def test_each_study_point_is_its_own_live_mlflow_run(mlflow_server, tmp_path, monkeypatch):
    allow(monkeypatch, mlflow_server)
    work = local_workdir(tmp_path)
    plan = write_plan(work, "swept", tracking={"mlflow_uri": mlflow_server, "experiment": "infra-study"})
    result = cli("run", str(plan), "--backend", "local", "--json", "--sweep", "train.lr=[0.01,0.02]", workdir=work)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = set()
    for status in (work / "experiments").glob("*/status.json"):
        exp_dir, record = status.parent, json.loads(status.read_text())
        assert record["state"] == "succeeded" and record.get("slot"), record  # run by a study slot
        (started,) = host_events(exp_dir, "tracking_started")  # live: created when the slot began the point
        (tracked,) = host_events(exp_dir, "tracked")
        assert tracked["run_id"] == started["run_id"]
        info = rest(mlflow_server, "runs/get", run_id=tracked["run_id"])["run"]["info"]
        assert info["status"] == "FINISHED"
        assert abs(int(info["start_time"]) - ms(record["started_at"])) <= 2000
        assert abs(int(info["end_time"]) - ms(record["finished_at"])) <= 2000
        runs.add(tracked["run_id"])
    assert len(runs) == 2


# --- attacks on the live client and the end's order ---------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
# A follower in its own process: starts the live client of the running attempt, says its folder, waits.
FOLLOWER = """
import json, sys
from pathlib import Path
from runner.run import tracking_live
from runner.run.records import Experiment
exp = Experiment(Path(sys.argv[1]))
record = exp.read()
tracking_live.begin(exp, record)
live = tracking_live._LIVE.get((str(exp.root), record["attempt"]))
print(json.dumps({"folder": str(live.folder) if live else None}), flush=True)
sys.stdin.read()
"""


def running_experiment(tmp_path: Path, uri: str):
    """A running attempt on disk whose plan tracks to `uri`: (experiment, record)."""
    from runner.run.records import Experiment, plan_sha256

    exp = Experiment(tmp_path / "experiments" / "x-1")
    exp.make_layout()
    plan = {"name": "p", "experiment_id": "x-1", "data": {"db": "/d.db"}, "model": {"name": "linear"},
            "tracking": {"mlflow_uri": uri}}  # fmt: skip
    (exp.root / "config" / "plan.json").write_text(json.dumps(plan))
    record = {"experiment_id": "x-1", "state": "running", "attempt": 1, "backend": "local",
              "plan_sha256": plan_sha256(plan), "db": "/d.db", "started_at": "2026-12-06T05:13:37.570Z"}  # fmt: skip
    exp.write(dict(record))
    return exp, record


def start_follower(exp) -> tuple[subprocess.Popen, str | None]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", FOLLOWER, str(exp.root)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, cwd=REPO)  # fmt: skip
    return proc, json.loads(proc.stdout.readline())["folder"]


def test_two_followers_of_one_attempt_start_one_live_client(tmp_path, monkeypatch):
    """A follower in another process started the attempt's live client; its server hangs, so no
    `tracking_started` event exists yet. A second follower attaching now (a study slot and an attached
    `infra run`) starts none: the O_EXCL claim at the experiment's top is taken."""
    from runner.run import tracking_live

    drip = Listener(drip=0.2)
    monkeypatch.setenv("INFRA_TRACKING_HOSTS", f"http://127.0.0.1:{drip.port}")
    exp, record = running_experiment(tmp_path, drip.uri)
    first, folder = start_follower(exp)
    try:
        assert folder is not None
        tracking_live.begin(exp, record)
        second = tracking_live.take(exp, record)
        if second is not None:
            second.close()
        assert second is None
        assert (exp.root / ".tracking-live-1").read_text().strip() == str(first.pid)
    finally:
        first.kill()
        first.wait()
        drip.close()


@pytest.mark.parametrize("hanging", [False, True], ids=["at-once", "while-the-server-hangs"])
def test_a_killed_follower_leaves_no_live_folder_behind(tmp_path, monkeypatch, hanging):
    """SIGKILL of the follower at once (its client may still be importing mlflow: its "ready" finds no
    reader) or while its client hangs on the server: the client removes its own folder and exits."""
    drip = Listener(drip=0.2)
    monkeypatch.setenv("INFRA_TRACKING_HOSTS", f"http://127.0.0.1:{drip.port}")
    exp, _ = running_experiment(tmp_path, drip.uri)
    follower, folder = start_follower(exp)
    try:
        assert folder is not None and Path(folder).is_dir()
        if hanging:
            until(lambda: drip.heads, "the live client's first request")  # it is hanging on it now
        follower.send_signal(signal.SIGKILL)
        follower.wait()
        until(lambda: not Path(folder).exists(), "the orphaned client removing its folder", timeout=60)
    finally:
        follower.kill()
        follower.wait()
        drip.close()


def test_a_metrics_file_rewritten_while_the_server_fails_keeps_the_client_small(tmp_path, monkeypatch):
    """The attack: a plugin writes 16 MiB of `{"epoch":0,"a":0}` lines, truncates the file and writes
    it again, while the server refuses everything. The old client re-read the file each time and kept
    every value in `pending` (~900k per rewrite); now each epoch enters once, and the shrink stops the
    live reader with a `tracking_live_stopped` event."""
    from runner.run.tracking import METRICS_LINES_LIMIT, _open_client
    from runner.run.tracking_live import _LiveState

    # what `_open_client` sets in its own process, set here so the test process gets them back after
    for name, value in (("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"), ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"),
                        ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"), ("MLFLOW_UV_AUTO_DETECT", "false")):  # fmt: skip
        monkeypatch.setenv(name, value)
    refuser = Listener()  # 403 to everything
    try:
        exp, record = running_experiment(tmp_path, refuser.uri)
        state = _LiveState(_open_client(refuser.uri), {"uri": refuser.uri, "experiment": "p",
                           "exp_root": str(exp.root), "attempt": 1, "tags": {}, "start_time": 0})  # fmt: skip
        line = b'{"epoch":0,"a":0}\n'
        flood = line * (METRICS_LINES_LIMIT // len(line))
        metrics = exp.root / "metrics" / "metrics.jsonl"
        for data in (flood, b"", flood):
            with metrics.open("wb") as fh:  # truncated in place, then written
                fh.write(data)
            with pytest.raises(Exception, match="403|Forbidden|PERMISSION"):
                state.log_epochs()
            assert len(state.pending) == 1  # epoch 0's one value, never again
        (stopped,) = [e for e in exp.events() if e["event"] == "tracking_live_stopped"]
        assert "shrank" in stopped["reason"] and stopped["attempt"] == 1
    finally:
        refuser.close()


class HoldArtifacts:
    """A loopback HTTP proxy in front of the real `mlflow server`: every request is forwarded, except
    artifact uploads, which it reads and never answers (a link too slow for a big checkpoint)."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.held: list[str] = []
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # the test's output stays the test's
                pass

            def forward(self):
                if self.command == "PUT" and "/mlflow-artifacts/" in self.path:
                    outer.held.append(self.path)
                    outer.release.wait()
                    self.close_connection = True
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                request = urllib.request.Request(outer.upstream + self.path, data=body, method=self.command,
                                                 headers=headers)  # fmt: skip
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        status, data, kind = response.status, response.read(), response.headers.get("Content-Type")
                except urllib.error.HTTPError as exc:
                    status, data, kind = exc.code, exc.read(), exc.headers.get("Content-Type")
                self.send_response(status)
                self.send_header("Content-Type", kind or "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_an_upload_that_runs_out_of_time_costs_the_files_not_the_runs_status(tmp_path, mlflow_server, monkeypatch):
    """Artifact uploads that never finish (a big checkpoint on a slow link): the run's status and end
    time are set before any file is sent, so the run is FINISHED and tracked; the `tracked` event and
    the run's `infra.artifacts_logged` tag say the files are not all there. (The old order uploaded
    first: the run stayed RUNNING and the end said tracking_failed.)"""
    from mlflow.tracking import MlflowClient

    from runner.run.records import Experiment, plan_sha256
    from runner.run.tracking import ARTIFACTS_PENDING, track_finished

    proxy = HoldArtifacts(mlflow_server)
    try:
        allow(monkeypatch, proxy.uri)
        monkeypatch.setenv("INFRA_TRACKING_TIMEOUT", "10")
        exp = Experiment(tmp_path / "experiments" / "x-1")
        exp.make_layout()
        plan = {"name": "slow", "experiment_id": "x-1", "data": {"db": "/d.db"}, "model": {"name": "linear"},
                "tracking": {"mlflow_uri": proxy.uri, "experiment": "infra-slow-upload"}}  # fmt: skip
        (exp.root / "config" / "plan.json").write_text(json.dumps(plan))
        (exp.root / "metrics" / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "train_loss": 0.5}) + "\n")
        record = {"experiment_id": "x-1", "state": "succeeded", "attempt": 1, "backend": "local",
                  "plan_sha256": plan_sha256(plan), "db": "/d.db", "started_at": "2026-12-06T05:13:37.570Z",
                  "finished_at": "2026-12-06T05:14:20.125Z"}  # fmt: skip
        exp.write(dict(record))
        run_id = track_finished(exp, record)
        assert run_id is not None and proxy.held  # an upload was tried, and held
        run = MlflowClient(tracking_uri=mlflow_server).get_run(run_id)
        assert run.info.status == "FINISHED" and run.info.end_time == ms(record["finished_at"])
        assert run.data.metrics["train_loss"] == 0.5
        assert run.data.tags["infra.artifacts_logged"] == ARTIFACTS_PENDING
        (tracked,) = [e for e in exp.events() if e["event"] == "tracked"]
        assert tracked["artifacts"].startswith("not all logged: gave up after 10 s (tracking_timeout)")
        assert not [e for e in exp.events() if e["event"] == "tracking_failed"]
    finally:
        proxy.close()
