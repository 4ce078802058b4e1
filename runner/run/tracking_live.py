"""Live MLflow logging while an attempt runs, from the host that follows it (docs/tracking.md).

`begin` (called by whoever follows a running attempt: `infra run`, a study's slot, a queue worker)
starts one long-lived MLflow client process per attempt and returns at once: the follow loop never
waits on it. That process creates the MLflow run (status RUNNING, start time = the record's
`started_at`), records its id as a `tracking_started` event, then reads `metrics/metrics.jsonl`
incrementally (through `runner.safefs`, bounded, the same rules as `tracking.epoch_metrics`) and
logs each new epoch. When the attempt is final, `runner.run.tracking.track_finished` takes the live
process (`take`), hands it the final payload and waits for it at most `tracking_timeout` seconds, then
kills it: a hanging server costs that much after the run and never changes its outcome.

The process ends by itself when the follower is gone (its stdin closes, or its parent changes) or
when the record turned final and nobody handed it the final payload within `ORPHAN_GRACE_S`: the
MLflow run then stays RUNNING until whoever finalises the attempt logs to it post-hoc (the run id is
in the `tracking_started` event).
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from runner import safefs
from runner.errors import InfraError
from runner.run.records import ACTIVE, Experiment

log = logging.getLogger(__name__)

POLL_S = 2.0  # how often the client looks for new epochs (one open + fstat of metrics.jsonl)
ORPHAN_GRACE_S = 120.0  # a final record with no final payload handed over: the follower is not coming
RETRY_MAX_S = 60.0  # back-off ceiling while the server refuses the run's creation or a batch
MAX_LINE = 64 << 10  # an epoch line longer than this is skipped, not buffered


@dataclass
class LiveRun:
    """One attempt's live client process and its private folder (removed when the run is done)."""

    key: tuple[str, int]
    proc: subprocess.Popen
    folder: Path
    done: bool = field(default=False)

    def finish(self, payload: dict, timeout: int) -> dict:
        """Hand the final payload over and wait for the result (at most `timeout` s after the client is
        ready); {"run_id", "experiment_id"}; ClientFailed when it fails or runs out of time."""
        from runner.run.tracking import CLIENT_START_S, ClientFailed, _Lines

        try:
            (self.folder / "final.json").write_text(json.dumps(payload), encoding="utf-8")
            try:
                self.proc.stdin.write(b"finish\n")
                self.proc.stdin.flush()
            except OSError:
                raise ClientFailed(f"ClientFailed: the live MLflow client had exited: {self._tail()}") from None
            lines = _Lines(self.proc.stdout)
            if lines.next(time.monotonic() + CLIENT_START_S) != "ready":
                raise ClientFailed(f"ClientFailed: the MLflow client did not start: {self._tail()}")
            result = lines.next(time.monotonic() + timeout)
            if result is None and lines.eof:
                raise ClientFailed(f"ClientFailed: the MLflow client exited without a result: {self._tail()}")
            if result is None:
                raise ClientFailed(
                    f"TimeoutError: gave up after {timeout} s (tracking_timeout): the server did not finish answering"
                )
            doc = json.loads(result)
            if "run_id" not in doc:
                raise ClientFailed(str(doc.get("error")))
            return doc
        finally:
            self.close()

    def _tail(self) -> str:
        try:
            return (self.folder / "client.log").read_bytes()[-600:].decode("utf-8", "replace").strip()[-300:]
        except OSError:
            return ""

    def close(self) -> None:
        """Stop the process (if still there) and remove its folder; the MLflow run is left as it is."""
        if self.done:
            return
        self.done = True
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:  # a pipe the killed client left half-written: nothing to flush into
                pass
        log.debug("live MLflow client log: %s", self._tail())
        shutil.rmtree(self.folder, ignore_errors=True)


_LIVE: dict[tuple[str, int], LiveRun] = {}
_LOCK = threading.Lock()


def _key(exp: Experiment, record: dict) -> tuple[str, int]:
    return (str(exp.root), int(record.get("attempt") or 0))


def begin(exp: Experiment, record: dict | None = None) -> None:
    """Start live logging of the running attempt `record` (read when None) when its plan asks for
    tracking, the server is allowed and the client installed; otherwise nothing (the end reports why).

    Never raises and never waits for the server: a problem here leaves the attempt to be logged
    post-hoc at its end, as before.
    """
    try:
        _begin(exp, exp.read() if record is None else record)
    except Exception as exc:  # noqa: BLE001 - the run must go on; its end logs it post-hoc and says why
        log.warning("%s: live MLflow logging not started (the run is logged when it ends): %s", exp.id, exc)


def _begin(exp: Experiment, record: dict) -> None:
    from runner.run.tracking import (
        client_installed,
        live_run_id,
        refused_server,
        run_tags,
        verified_plan,
    )
    from runner.settings import node_settings

    if record.get("state") != "running" or not record.get("started_at"):
        return
    try:
        plan = verified_plan(exp, record)
    except (InfraError, OSError):
        return  # the end reports it (tracking_failed) with the reason
    tracking = plan.get("tracking") if plan else None
    if not tracking or not client_installed():
        return
    uri = tracking["mlflow_uri"]
    if refused_server(uri, node_settings().tracking_hosts) is not None:
        return
    key = _key(exp, record)
    with _LOCK:
        for stale in [k for k, live in _LIVE.items() if live.proc.poll() is not None]:
            _LIVE.pop(stale).close()
        if key in _LIVE or live_run_id(exp, record) is not None:
            return  # another follower (or an earlier one of this process) has the live run
        folder = Path(tempfile.mkdtemp(prefix="infra-live-"))
        payload = {
            "uri": uri,
            "experiment": tracking.get("experiment") or plan["name"],
            "exp_root": str(exp.root),
            "attempt": key[1],
            "tags": run_tags(exp, record, live=True),
            "start_time": _ms(record["started_at"]),
        }
        (folder / "live.json").write_text(json.dumps(payload), encoding="utf-8")
        code = "import sys; from runner.run.tracking_live import _live_main; _live_main(sys.argv[1])"
        with (folder / "client.log").open("wb") as client_log:
            proc = subprocess.Popen(  # -P and cwd: nothing importable from a workdir reaches the child
                [sys.executable, "-P", "-c", code, str(folder)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=client_log,
                cwd=folder,
            )
        _LIVE[key] = LiveRun(key, proc, folder)
    log.info("%s: logging to MLflow at %s while it runs", exp.id, uri)


def take(exp: Experiment, record: dict) -> LiveRun | None:
    """The live client of the attempt `record`, removed from the registry (the finaliser owns it now)."""
    with _LOCK:
        live = _LIVE.pop(_key(exp, record), None)
    if live is not None and live.proc.poll() is not None:
        live.close()  # it died: the finaliser logs post-hoc to the run its event names
        return None
    return live


def end(exp: Experiment) -> None:
    """The follower of `exp` is done: a live client nobody finalised (another reader finalised the
    attempt, or it failed before its end) is stopped; the run stays for whoever logs the attempt."""
    with _LOCK:
        keys = [k for k in _LIVE if k[0] == str(exp.root)]
        found = [_LIVE.pop(k) for k in keys]
    for live in found:
        live.close()


def _ms(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


# --- the client process ------------------------------------------------------------------------------


class EpochReader:
    """New epoch records of an experiment's `metrics/metrics.jsonl`, from where the last call stopped.

    Untrusted like `tracking.epoch_metrics`: read through safefs (no links), only complete lines, a
    line over `MAX_LINE` skipped, at most `METRICS_LINES_LIMIT` bytes in all; a file that shrank
    (replaced) is read again from its start.
    """

    def __init__(self, root: Path):
        self.root = root
        self.offset = 0

    def new(self) -> list[tuple[int, str, float]]:
        from runner.run.tracking import METRICS_LINES_LIMIT, epoch_values

        try:
            with safefs.open_read(self.root, "metrics/metrics.jsonl") as fh:
                size = min(os.fstat(fh.fileno()).st_size, METRICS_LINES_LIMIT)
                if size < self.offset:
                    self.offset = 0
                fh.seek(self.offset)
                data = fh.read(size - self.offset)
        except (FileNotFoundError, safefs.Tampered):
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        out = []
        for line in data[:end].split(b"\n"):
            if len(line) > MAX_LINE:
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            out += epoch_values(doc)
        return out


def _live_main(folder: str) -> None:
    """The live client: "ready" once mlflow is imported; epochs while the run goes; on "finish" on stdin,
    the final payload (final.json) and one JSON result line. Ends without a result when its parent goes."""
    from runner.run.tracking import _error_text, _open_client

    here = Path(folder)
    result = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    payload = json.loads((here / "live.json").read_text(encoding="utf-8"))
    parent = os.getppid()
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    client = _open_client(payload["uri"])
    result.write("ready\n")
    result.flush()
    state = _LiveState(client, payload)
    finishing = _follow(state)
    if not finishing:
        return  # the follower went away: whoever finalises the attempt logs it (to state.run_id)
    final = json.loads((here / "final.json").read_text(encoding="utf-8"))
    signal.alarm(int(final["timeout"]) + 10)  # ends this process should its parent stop waiting
    try:
        state.log_epochs()  # the lines written since the last poll, at the time they were seen
    except Exception as exc:  # noqa: BLE001 - the final payload holds them too (at the attempt's end time)
        print(f"live logging: {_error_text(exc)}", file=sys.stderr, flush=True)
    try:
        from runner.run.tracking import _send

        doc = _send(client, final, here, run_id=state.run_id, experiment_id=state.experiment_id, logged=state.logged)
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        doc = {"error": _error_text(exc)}
    result.write(json.dumps(doc) + "\n")
    result.flush()


def _watch_parent(parent: int) -> None:
    """A request that hangs cannot see stdin close: this thread ends the process once its parent is gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


class _LiveState:
    def __init__(self, client, payload: dict):
        self.client = client
        self.payload = payload
        self.exp = Experiment(Path(payload["exp_root"]))
        self.reader = EpochReader(self.exp.root)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.logged: dict[tuple[str, int], float] = {}  # (metric, step) → value, as sent
        self.pending: list[tuple[int, str, float, int]] = []
        self.wait = 0.0  # the run is created at once; epochs are looked for every POLL_S after that

    def ensure_run(self) -> None:
        if self.run_id is not None:
            return
        from runner.run.tracking import _experiment_id

        self.experiment_id = _experiment_id(self.client, self.payload["experiment"])
        run = self.client.create_run(
            self.experiment_id, start_time=self.payload["start_time"], tags=self.payload["tags"]
        )
        self.run_id = run.info.run_id
        self.exp.event("tracking_started", attempt=self.payload["attempt"], mlflow_uri=self.payload["uri"],
                       mlflow_experiment=self.payload["experiment"], mlflow_experiment_id=self.experiment_id,
                       run_id=self.run_id)  # fmt: skip

    def log_epochs(self) -> None:
        from mlflow.entities import Metric

        from runner.run.tracking import METRICS_PER_BATCH

        now = int(time.time() * 1000)
        self.pending += [(step, name, value, now) for step, name, value in self.reader.new()]
        if not self.pending:
            return
        self.ensure_run()
        while self.pending:
            chunk = self.pending[:METRICS_PER_BATCH]
            self.client.log_batch(self.run_id, metrics=[Metric(n, v, ts, s) for s, n, v, ts in chunk])
            for s, n, v, _ in chunk:
                self.logged[(n, s)] = v
            del self.pending[: len(chunk)]

    def final_record(self) -> bool:
        """Whether the attempt's record is final (or another attempt began): nobody else will follow it."""
        try:
            record = self.exp.read()
        except InfraError:
            return True
        return record.get("state") not in ACTIVE or record.get("attempt") != self.payload["attempt"]


def _follow(state: _LiveState) -> bool:
    """Log epochs until "finish" arrives on stdin (True) or the follower is gone (False)."""
    from runner.run.tracking import _error_text

    stdin = sys.stdin.buffer
    final_since = None
    with selectors.DefaultSelector() as selector:
        selector.register(stdin.fileno(), selectors.EVENT_READ)
        while True:
            if selector.select(state.wait):
                line = stdin.readline()
                return line.strip() == b"finish"  # EOF: the follower is gone
            try:
                state.ensure_run()
                state.log_epochs()
                state.wait = POLL_S
            except Exception as exc:  # noqa: BLE001 - a server problem: try again later, report at the end
                print(f"live logging: {_error_text(exc)}", file=sys.stderr, flush=True)
                state.wait = min(state.wait * 2, RETRY_MAX_S)
            if state.final_record():
                final_since = final_since or time.monotonic()
                if time.monotonic() - final_since > ORPHAN_GRACE_S:
                    return False
