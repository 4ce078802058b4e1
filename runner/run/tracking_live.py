"""Live MLflow logging while an attempt runs, from the host that follows it (docs/tracking.md).

`begin` (called by whoever follows a running attempt: `infra run`, a study's slot, a queue worker)
starts one long-lived MLflow client process per attempt and returns at once: the follow loop never
waits on it. That process creates the MLflow run (status RUNNING, start time = the record's
`started_at`), records its id as a `tracking_started` event, then reads `metrics/metrics.jsonl`
incrementally (`EpochReader`: through `runner.safefs`, each byte once, `METRICS_LINES_LIMIT` bytes
over its whole life; a file that shrinks or is replaced stops it) and logs each new epoch once. One
client per attempt, whichever followers attach: `begin` takes an O_EXCL claim file at the
experiment's host-only top first. When the attempt is final, `runner.run.tracking.track_finished` takes the live
process (`take`), hands it the final payload and waits for it at most `tracking_timeout` seconds, then
kills it: a hanging server costs that much after the run and never changes its outcome.

The process ends by itself (removing its folder) when the follower is gone (its stdin closes, or its
parent changes) or when the record turned final and nobody handed it the final payload within
`ORPHAN_GRACE_S`: the MLflow run then stays RUNNING until whoever finalises the attempt logs to it
post-hoc (the run id is in the `tracking_started` event).
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
METRICS_REL = "metrics/metrics.jsonl"
CLAIM = ".tracking-live-{attempt}"  # at the experiment's host-only top: this attempt has its live client


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
        from runner.run.tracking import ClientFailed, _Lines, client_results

        try:
            try:
                (self.folder / "final.json").write_text(json.dumps(payload), encoding="utf-8")
                self.proc.stdin.write(b"finish\n")
                self.proc.stdin.flush()
            except OSError:  # it gave up waiting (ORPHAN_GRACE_S) and removed its folder, or died
                raise ClientFailed(f"ClientFailed: the live MLflow client had exited: {self._tail()}") from None
            return client_results(_Lines(self.proc.stdout), timeout, self._tail)
        finally:
            self.close()

    def _tail(self) -> str:
        from runner.run.tracking import client_log_tail

        return client_log_tail(self.folder)

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


def begin(exp: Experiment, record: dict | None = None, outputs: Path | None = None) -> None:
    """Start live logging of the running attempt `record` (read when None) when its plan asks for
    tracking, the server is allowed and the client installed; otherwise nothing (the end reports why).
    `outputs`: where the experiment's output folders (config/, metrics/) are while it runs, when not
    in the experiment directory (a docker study slot moves them into its own folder until the point
    ends: `slots.stage_outputs`).

    Never raises and never waits for the server: a problem here leaves the attempt to be logged
    post-hoc at its end, as before.
    """
    try:
        _begin(exp, exp.read() if record is None else record, outputs or exp.root)
    except Exception as exc:  # noqa: BLE001 - the run must go on; its end logs it post-hoc and says why
        log.warning("%s: live MLflow logging not started (the run is logged when it ends): %s", exp.id, exc)


def _begin(exp: Experiment, record: dict, outputs: Path) -> None:
    from runner.run.tracking import client_installed, live_run_id, refused_server, verified_plan
    from runner.settings import node_settings

    if record.get("state") != "running" or not record.get("started_at"):
        return
    try:
        plan = verified_plan(Experiment(outputs), record)  # the plan the host wrote, where it is now
    except (InfraError, OSError):
        return  # the end reports it (tracking_failed) with the reason
    tracking = plan.get("tracking") if plan else None
    if not tracking or not client_installed():
        return
    uri = tracking["mlflow_uri"]
    if (refusal := refused_server(uri, node_settings().tracking_hosts)) is not None:
        log.info("%s: not logged to MLflow while it runs: %s", exp.id, refusal)  # the end warns once
        return
    key = _key(exp, record)
    with _LOCK:
        for stale in [k for k, live in _LIVE.items() if live.proc.poll() is not None]:
            _LIVE.pop(stale).close()
        if key in _LIVE or live_run_id(exp, record) is not None or not _claim(exp, key[1]):
            return  # another follower (of this process or another) has the live run
        try:
            _start(exp, record, key, uri, tracking, plan, outputs)
        except BaseException:
            _unclaim(exp, key[1])  # nothing started: another follower may try
            raise
    log.info("%s: logging to MLflow at %s while it runs", exp.id, uri)


def _claim(exp: Experiment, attempt: int) -> bool:
    """Whether this call took the attempt's one live client: a file created with O_EXCL at the
    experiment's top (host-only, never mounted), so two followers attaching at the same moment, in
    two processes, start one client. It stays: a follower that attaches later starts none."""
    with safefs.open_dir(exp.root) as dfd:
        try:
            fd = os.open(CLAIM.format(attempt=attempt), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=dfd)  # fmt: skip
        except FileExistsError:
            return False
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    return True


def _unclaim(exp: Experiment, attempt: int) -> None:
    with safefs.open_dir(exp.root) as dfd:
        try:
            os.unlink(CLAIM.format(attempt=attempt), dir_fd=dfd)
        except FileNotFoundError:
            pass


def _start(
    exp: Experiment, record: dict, key: tuple[str, int], uri: str, tracking: dict, plan: dict, outputs: Path
) -> None:
    from runner.run.tracking import run_tags

    folder = Path(tempfile.mkdtemp(prefix="infra-live-"))
    try:
        payload = {
            "uri": uri,
            "experiment": tracking.get("experiment") or plan["name"],
            "exp_root": str(exp.root),
            "outputs_root": str(outputs),  # metrics/metrics.jsonl is read here while the attempt runs
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
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    _LIVE[key] = LiveRun(key, proc, folder)


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

    Untrusted like `tracking.epoch_metrics`, and read every `POLL_S` for as long as the run goes, so
    bounded over its whole life, not per call: through safefs (a link or FIFO is not followed and never
    blocks), each byte read once and `METRICS_LINES_LIMIT` bytes in all, only complete lines (a line
    over `MAX_LINE` skipped, never buffered), each epoch once (its first record: an epoch already
    logged is not sent again), at most `MAX_METRIC_VALUES` values. The core only appends to the file,
    so a file that shrank, was replaced (another inode) or is not a regular file is a training
    tampering with it: the reader stops (`stopped` says why) and the attempt's end logs the file
    post-hoc, with its own caps. A file that is gone is waited for (a study slot moves the output
    folders back when its point ends); one that reappears as another file is "replaced".
    """

    def __init__(self, root: Path):
        self.root = root
        self.offset = 0  # bytes consumed, over the reader's life
        self.identity: tuple[int, int] | None = None  # (device, inode) of the file first read
        self.partial = b""  # the start of a line not complete yet (at most MAX_LINE bytes)
        self.skipping = False  # inside a line over MAX_LINE: dropped up to its newline
        self.epochs: set[int] = set()
        self.values = 0
        self.stopped: str | None = None

    def new(self) -> list[tuple[int, str, float]]:
        from runner.run.tracking import METRICS_LINES_LIMIT

        if self.stopped is not None:
            return []
        try:
            with safefs.open_read(self.root, METRICS_REL) as fh:
                st = os.fstat(fh.fileno())
                if self.identity is None:
                    self.identity = (st.st_dev, st.st_ino)
                elif (st.st_dev, st.st_ino) != self.identity:
                    return self._stop("was replaced by another file")
                if st.st_size < self.offset:
                    return self._stop(f"shrank from {self.offset} to {st.st_size} bytes")
                fh.seek(self.offset)
                chunk = fh.read(max(0, min(st.st_size, METRICS_LINES_LIMIT) - self.offset))
        except FileNotFoundError:
            return []  # not there yet, or moved back by the slot at the point's end: nothing to read
        except safefs.Tampered as exc:
            return self._stop(exc.message)
        self.offset += len(chunk)
        out = self._values(chunk)
        if self.offset >= METRICS_LINES_LIMIT and self.stopped is None:
            self._stop(f"reached the {METRICS_LINES_LIMIT} bytes read live")
        return out

    def _values(self, chunk: bytes) -> list[tuple[int, str, float]]:
        from runner.run.tracking import MAX_METRIC_VALUES, epoch_values

        data = self.partial + chunk
        if self.skipping:
            cut = data.find(b"\n")
            if cut < 0:
                return []
            data, self.skipping = data[cut + 1 :], False
        lines = data.split(b"\n")
        self.partial = lines.pop()
        if len(self.partial) > MAX_LINE:
            self.partial, self.skipping = b"", True
        out: list[tuple[int, str, float]] = []
        for line in lines:
            if len(line) > MAX_LINE:
                continue
            try:
                values = epoch_values(json.loads(line))
            except ValueError:
                continue
            if not values or values[0][0] in self.epochs:
                continue
            room = MAX_METRIC_VALUES - self.values
            if room <= 0:
                self._stop(f"reached the {MAX_METRIC_VALUES} values logged live")
                break
            self.epochs.add(values[0][0])
            self.values += len(values[:room])
            out += values[:room]
        return out

    def _stop(self, why: str) -> list:
        self.stopped = f"{METRICS_REL} {why}"
        return []


def _live_main(folder: str) -> None:
    """The live client: "ready" once mlflow is imported; epochs while the run goes; on "finish" on stdin,
    the final payload (final.json) and two JSON result lines (tracking.client_results). Ends without a
    result when its parent goes."""
    here = Path(folder)
    handed_over = False  # "finish" came: the follower waits for the result and removes the folder
    try:
        handed_over = _live(here)
    finally:
        if not handed_over:  # the follower is gone (or this failed first): nobody else removes the folder
            shutil.rmtree(here, ignore_errors=True)


def _live(here: Path) -> bool:
    from runner.run.tracking import _error_text, _open_client, _sayer, send_and_say

    result = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    payload = json.loads((here / "live.json").read_text(encoding="utf-8"))
    parent = os.getppid()
    threading.Thread(target=_watch_parent, args=(parent, here), daemon=True).start()
    client = _open_client(payload["uri"])
    say = _sayer(result)
    say("ready")  # a follower killed meanwhile: BrokenPipeError, and the folder goes
    state = _LiveState(client, payload)
    if not _follow(state):
        return False  # the follower went away: whoever finalises the attempt logs it (to state.run_id)
    final = json.loads((here / "final.json").read_text(encoding="utf-8"))
    signal.alarm(int(final["timeout"]) + 10)  # ends this process should its parent stop waiting
    try:
        state.log_epochs()  # the lines written since the last poll, at the time they were seen
    except Exception as exc:  # noqa: BLE001 - the final payload holds them too (at the attempt's end time)
        print(f"live logging: {_error_text(exc)}", file=sys.stderr, flush=True)
    send_and_say(client, final, here, say, run_id=state.run_id, experiment_id=state.experiment_id,
                 logged=state.logged)  # fmt: skip
    return True


def _watch_parent(parent: int, folder: Path) -> None:
    """A request that hangs cannot see stdin close: this thread ends the process once its parent is
    gone (a SIGKILLed follower), removing the process's folder (nobody else will)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    shutil.rmtree(folder, ignore_errors=True)
    os._exit(0)


class _LiveState:
    def __init__(self, client, payload: dict):
        self.client = client
        self.payload = payload
        self.exp = Experiment(Path(payload["exp_root"]))
        self.reader = EpochReader(Path(payload.get("outputs_root") or payload["exp_root"]))
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.logged: dict[tuple[str, int], float] = {}  # (metric, step) → value, as sent
        # read but not yet sent (the server failing): each value enters once (the reader's caps), so
        # at most MAX_METRIC_VALUES
        self.pending: list[tuple[int, str, float, int]] = []
        self.stop_said = False
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
        if self.reader.stopped is not None and not self.stop_said:
            self.stop_said = True  # said once, before any request: a failing server does not hide it
            print(f"live logging stopped: {self.reader.stopped}", file=sys.stderr, flush=True)
            self.exp.event("tracking_live_stopped", attempt=self.payload["attempt"], reason=self.reader.stopped)
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
