"""Attacks on MLflow tracking from a plan (a queue job is one): where the host's credentials go, and a
server that never finishes answering. The servers are real sockets on loopback, the client is the
real MLflow client that infra starts; the experiment is a finished one on disk, as a worker leaves it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest

from tests.helpers import cli

try:
    import mlflow  # noqa: F401 - the client infra runs
except ImportError:  # in CI (CI=true) the dev extra must have installed it: fail, never skip
    if os.environ.get("CI"):
        raise
    pytest.skip("needs mlflow (the dev extra): pip install -e '.[core,dev]'", allow_module_level=True)

TOKEN = "lab-token-0f9e8d"
PASSWORD = "lab-password-7a6b5c"


class Listener:
    """A loopback HTTP server in a thread that records each request's head and answers as told.

    `drip=None`: answers 403 (the client gives up at once). `drip=seconds`: sends a status line and
    the start of a header, then one more byte of that header every `drip` seconds until the test ends.
    Every read gets data long before the per-request timeout and Python's header limits (100 lines,
    64 KiB a line) take hours to reach, so only an overall deadline ends it.
    """

    def __init__(self, drip: float | None = None):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.drip = drip
        self.heads: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)  # to see `stop`; not a timing assumption of the test
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                head += chunk
            self.heads.append(head.decode("latin-1"))
            if self.drip is None:
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Drip: ")
            while not self.stop.wait(self.drip):
                try:
                    conn.sendall(b"a")
                except OSError:  # the client hung up: what the test wants
                    return

    def authorizations(self) -> list[str]:
        return [line for head in self.heads for line in head.split("\r\n") if line.lower().startswith("authorization:")]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


@pytest.fixture
def credentials(monkeypatch):
    """The lab's MLflow credentials in the host's environment, as a worker's service would have them."""
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "lab")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    for var in ("INFRA_TRACKING_HOSTS", "INFRA_TRACKING_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)


def finished_experiment(root: Path, uri: str):
    """A succeeded experiment whose (host-written, hash-checked) plan logs to `uri`."""
    from runner.run.records import Experiment, plan_sha256

    exp = Experiment(root / "experiments" / "x-1")
    exp.make_layout()
    plan = {
        "name": "tracked",
        "experiment_id": "x-1",
        "data": {"db": "/data/blat.db"},
        "model": {"name": "linear"},
        "tracking": {"mlflow_uri": uri, "experiment": "stolen"},
    }
    record = {
        "experiment_id": "x-1",
        "state": "succeeded",
        "attempt": 1,
        "backend": "docker",
        "plan_sha256": plan_sha256({**plan, "data": {"db": "/host/blat.db"}}),
        "db": "/host/blat.db",
    }
    exp.write(dict(record))
    (exp.root / "config" / "plan.json").write_text(json.dumps(plan))
    return exp, record


def events(exp, kind: str) -> list[dict]:
    lines = (exp.root / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def test_a_plan_naming_an_unlisted_server_gets_no_request_and_no_credentials(
    tmp_path, listener, credentials, monkeypatch, caplog
):
    from runner.run.tracking import track_finished

    exp, record = finished_experiment(tmp_path, listener.uri)
    with caplog.at_level("WARNING"):
        assert track_finished(exp, record) is None
    assert listener.heads == []  # not a byte sent: neither credentials nor the lab's results
    (event,) = events(exp, "tracking_failed")
    address = f"http://127.0.0.1:{listener.port}"
    assert f"{address} is not in this node's tracking_hosts (none)" in event["error"]
    assert f"infra config set tracking_hosts {address}" in event["error"]
    (warning,) = [r.getMessage() for r in caplog.records if "not logged to MLflow" in r.getMessage()]
    assert "\n" not in warning and address in warning

    # another host listed, or the same host at another port, does not let it through either
    monkeypatch.setenv("INFRA_TRACKING_HOSTS", f"mlflow.lab,http://127.0.0.1:{listener.port + 1},http://127.0.0.1")
    assert track_finished(exp, record) is None
    assert listener.heads == [] and len(events(exp, "tracking_failed")) == 2


def test_a_plain_entry_allows_https_only_so_a_plan_cannot_downgrade_it_to_http(
    tmp_path, listener, credentials, monkeypatch
):
    """`127.0.0.1:PORT` listed means https there: a plan naming http:// at that address would send the
    credentials in clear (review of issue 23); it gets no request, and the message names the entry to add."""
    from runner.run.tracking import track_finished

    monkeypatch.setenv("INFRA_TRACKING_HOSTS", f"127.0.0.1:{listener.port}")
    exp, record = finished_experiment(tmp_path, listener.uri)
    assert listener.uri.startswith("http://")
    assert track_finished(exp, record) is None
    assert listener.heads == []
    (event,) = events(exp, "tracking_failed")
    assert f"tracking_hosts 127.0.0.1:{listener.port},http://127.0.0.1:{listener.port}'" in event["error"]


def test_the_listed_server_gets_the_credentials(tmp_path, listener, credentials, monkeypatch):
    """The counterpart: the listener does see credentials when the node owner listed it (so the test
    above would have seen them), and the failure it answers with is reported, never raised."""
    from runner.run.tracking import track_finished

    monkeypatch.setenv("INFRA_TRACKING_HOSTS", f"mlflow.lab,http://127.0.0.1:{listener.port}")
    exp, record = finished_experiment(tmp_path, listener.uri)
    assert track_finished(exp, record) is None
    assert listener.heads, "the listed server got no request"
    assert any(TOKEN in line or "Basic" in line for line in listener.authorizations()), listener.heads[0]
    (event,) = events(exp, "tracking_failed")
    assert "403" in event["error"] and TOKEN not in event["error"]


def test_a_run_whose_plan_names_an_unlisted_server_is_refused_before_anything_runs(
    tmp_path, listener, credentials, mini_db
):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"name": "p", "data": {"db": str(mini_db)}, "model": {"name": "linear"},
                                "tracking": {"mlflow_uri": listener.uri}}))  # fmt: skip
    result = cli("run", str(plan), "--backend", "local", workdir=tmp_path)
    assert result.returncode == 3, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("infra: error:")]
    assert f"http://127.0.0.1:{listener.port} is not in this node's tracking_hosts" in line and str(plan) in line
    assert not (tmp_path / "experiments").exists() or not any((tmp_path / "experiments").iterdir())
    assert listener.heads == []


def test_infra_track_to_the_plans_unlisted_server_is_exit_3_and_sends_nothing(tmp_path, listener, credentials):
    exp, _ = finished_experiment(tmp_path, listener.uri)
    result = cli("track", exp.id, workdir=tmp_path)
    assert result.returncode == 3, result.stderr
    assert "is not in this node's tracking_hosts" in result.stderr and TOKEN not in result.stderr
    assert listener.heads == []


def test_a_dripping_server_is_cut_off_at_the_tracking_deadline(tmp_path, credentials, monkeypatch):
    """A listed server that sends one byte of its answer's head every 0.2 s forever: each read succeeds
    well within the per-request timeout, so only an overall deadline ends it. `tracking_timeout` is
    3 s here; the test checks that the call ended and reported that deadline, not how fast."""
    from runner.run.tracking import track_finished

    drip = Listener(drip=0.2)
    try:
        monkeypatch.setenv("INFRA_TRACKING_HOSTS", f"http://127.0.0.1:{drip.port}")
        monkeypatch.setenv("INFRA_TRACKING_TIMEOUT", "3")
        exp, record = finished_experiment(tmp_path, drip.uri)
        done = threading.Event()
        worker = threading.Thread(target=lambda: (track_finished(exp, record), done.set()), daemon=True)
        worker.start()
        # a guard against hanging the suite (the old code ran for hours), not a measure of speed
        assert done.wait(120), "tracking did not end: the deadline does not bound a dripping server"
        (event,) = events(exp, "tracking_failed")
        assert "gave up after 3 s (tracking_timeout)" in event["error"]
        assert drip.heads and drip.heads[0].startswith("GET /api/"), drip.heads  # it did reach the server
        assert not events(exp, "tracked")
    finally:
        drip.close()
