"""Logging a finished attempt to an MLflow tracking server, from the host (docs/tracking.md).

Called once per attempt, by whoever finalised it (`runner.run.backends`: the foreground runner, a
queue worker, or the `infra status`/`ls` reader that reconciled a detached run), after the final
state is on record. The container never talks to the server: its network stays `none`.

Everything read here comes from the experiment's mounted folders, i.e. from the training: the plan
is used only when it hashes to the record's `plan_sha256` (so the server the host contacts is the
one the host's plan named), numbers must be finite, names plain, sizes and counts capped, and files
are read through `runner.safefs`. Requests (and the host's `MLFLOW_TRACKING_*` credentials) go only
to a server in the node's `tracking_hosts` setting: a plan cannot send them elsewhere. The MLflow
client runs in a child process that is killed at the node's `tracking_timeout`, so a server that
answers slowly forever costs that long and no more. A server that is unreachable, not allowed or
refuses anything costs a bounded time, one warning and a `tracking_failed` event; it never changes
the run's state or exit code.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from runner import __version__, safefs
from runner.errors import EnvironmentProblem, InfraError
from runner.run.records import Experiment, metrics_summary, plan_sha256
from runner.settings import node_settings, parse_host

log = logging.getLogger(__name__)

TRACKED_STATES = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}
# MLflow's client retries 7 times over minutes by default; a finished run must not wait on that.
REQUEST_TIMEOUT_S = 10
REQUEST_RETRIES = 1
CLIENT_START_S = 120  # the client's process importing mlflow; the network deadline starts after it
RESULT_LINE_LIMIT = 64 << 10
DEFAULT_PORTS = {"http": 80, "https": 443}
METRICS_LINES_LIMIT = 16 << 20  # metrics.jsonl read back at most (live: over the client's whole life)
MAX_EPOCHS_LOGGED = 100_000
MAX_NAMES_PER_EPOCH = 100  # values taken from one epoch record (the core writes about 20)
MAX_METRIC_VALUES = 100_000  # epoch values logged per attempt (1000 epochs of 100 names), live or post-hoc
MAX_PLOTS = 32
PLOT_LIMIT = 8 << 20  # a matplotlib PNG is ~100 KB
PARAM_VALUE_LIMIT = 500
PARAMS_PER_BATCH = 100  # MLflow's log_batch limits: 100 params, 1000 metrics per request
METRICS_PER_BATCH = 1000
NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
PLOT_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,100}\.png$")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DB_HASH_LIMIT = 16 << 30  # sha256 reads ~0.5-1 GiB/s: at most half a minute per database version
# Files of the experiment logged as artifacts: (path, MLflow artifact folder, size cap). Beyond the cap
# a file is skipped with a warning and named in the `infra.artifacts_skipped` tag. The caps bound what
# the client copies (one file at a time, into a private temporary folder) and uploads after the run's
# status is set: a test split's predictions are a few MB, the logs far less.
ARTIFACT_FILES = (
    ("config/plan.json", "config", 16 << 20),
    ("metrics/metrics.json", "metrics", 16 << 20),
    ("metrics/metrics.jsonl", "metrics", METRICS_LINES_LIMIT),
    ("artifacts/predictions.parquet", "predictions", 64 << 20),
    ("artifacts/predictions.csv", "predictions", 64 << 20),
    ("logs/train.log", "logs", 16 << 20),
    ("container.log", "logs", 16 << 20),  # the host's copy of the output (host-written, capped there too)
)
MODEL_FILE_LIMIT = 256 << 20  # one file of the MLflow model; infra's built-in models' checkpoints are a few MB
# A checkpoint is torch.save's output: a zip archive (torch >= 1.6) or a pickle (protocol 2+ starts with
# PROTO, 0x80). Anything else under ckpts/ is not copied as the model's checkpoint.
CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")
ARTIFACTS_PENDING = "no: the upload did not finish (tracking_timeout or a server error; see the tracked event)"
MODEL_CODE = Path(__file__).resolve().parent.parent / "core" / "mlflow_model.py"
BUILTIN = {  # components whose code is infra's own; anything else is a workdir plugin (no MLflow model)
    "model": {"ridge", "linear", "mlp", "cnn", "ge"},
    "embeddings": {"onehot", "blosum62"},  # plm needs the node's model store: no MLflow model
    "vocab": {"IUPAC"},
}


def client_installed() -> bool:
    """Whether the MLflow client can be imported here (found without importing it: plan loading stays fast)."""
    try:
        return importlib.util.find_spec("mlflow") is not None
    except (ImportError, ValueError):  # a broken or blocked install is no client either
        return False


def require_client(source: str, uri: str | None = None) -> None:
    """EnvironmentProblem (exit 3) when a plan asks for tracking and this host lacks the MLflow client,
    or (with `uri`) when the plan's server is not one of the node's `tracking_hosts`."""
    if not client_installed():
        raise EnvironmentProblem(
            f"{source}: tracking.mlflow_uri needs the MLflow client on this host: "
            "pip install 'infra[tracking]' (or remove the plan's tracking section)"
        )
    if uri is not None and (refusal := refused_server(uri, node_settings().tracking_hosts)):
        raise EnvironmentProblem(f"{source}: tracking.mlflow_uri: {refusal} (or remove the plan's tracking section)")


def server_address(uri: str) -> str | None:
    """`https://MLflow.lab/x` → "mlflow.lab:443", `http://a.lab:5000` → "http://a.lab:5000": the server a
    URI names, port explicit, `http://` kept (cleartext is listed apart); None when its authority is
    not a plain host[:port] (then nothing is sent: the client might read it otherwise)."""
    parts = urlsplit(uri)
    parsed = parse_host(parts.netloc) if parts.scheme in DEFAULT_PORTS else None
    if parsed is None:
        return None
    host, port = parsed
    return ("http://" if parts.scheme == "http" else "") + f"{host}:{port or DEFAULT_PORTS[parts.scheme]}"


def _with_port(entry: str) -> str:
    """A `tracking_hosts` entry with its port explicit: `a.lab` → `a.lab:443`, `http://a.lab` → `http://a.lab:80`."""
    scheme = "http" if entry.startswith("http://") else "https"
    bare = entry[len("http://") :] if scheme == "http" else entry
    has_port = ":" in bare.rsplit("]", 1)[-1]
    return entry if has_port else f"{entry}:{DEFAULT_PORTS[scheme]}"


def refused_server(uri: str, allowed: tuple[str, ...]) -> str | None:
    """Why `uri`'s server gets no request from this node (None when it is allowed).

    Allowed are the node's `tracking_hosts`: `host:port` exactly, or `host` at port 443, over https;
    `http://host[:port]` entries (port 80 by default) over cleartext http. The MLflow client sends the
    host's `MLFLOW_TRACKING_*` credentials with every request, and plans (queue jobs included) are not
    trusted to choose where, nor to downgrade a listed https server to http.
    """
    address = server_address(uri)
    if address is None:
        return "the server is not a plain host[:port]; nothing is sent"
    if address in {_with_port(entry) for entry in allowed}:
        return None
    listed = ",".join(allowed) or "none"
    return (
        f"{address} is not in this node's tracking_hosts ({listed}); infra sends results and its MLflow "
        f"credentials only to servers listed there: allow it with "
        f"'infra config set tracking_hosts {','.join((*allowed, address))}'"
    )


def track_finished(exp: Experiment, record: dict) -> str | None:
    """Log the finished attempt `record` of `exp` when its plan has a tracking section; the MLflow run id.

    The attempt's live run (`runner.run.tracking_live`: this process followed it) gets the final
    payload; without one, the run its `tracking_started` event names (a follower that went away) or
    a new run is logged post-hoc. Never raises for a tracking problem: it is reported as a warning
    and a `tracking_failed` event.
    """
    from runner.run import tracking_live

    live = tracking_live.take(exp, record)
    try:
        return _track_finished(exp, record, live)
    finally:
        if live is not None:
            live.close()


def _track_finished(exp: Experiment, record: dict, live) -> str | None:
    if record.get("state") not in TRACKED_STATES:
        return None
    try:
        plan = verified_plan(exp, record)
    except (InfraError, OSError) as exc:
        message = exc.message if isinstance(exc, InfraError) else f"config/plan.json cannot be read ({exc.strerror})"
        log.warning("%s: not tracked: %s", exp.id, message)
        exp.event("tracking_failed", error=message)
        return None
    tracking = plan.get("tracking") if plan else None
    if not tracking:
        return None
    uri, name = tracking["mlflow_uri"], tracking.get("experiment") or plan["name"]
    try:
        settings = node_settings()
        refusal = refused_server(uri, settings.tracking_hosts)
    except InfraError as exc:  # a damaged config file: nothing is sent
        refusal = exc.message
    if refusal is None:
        try:
            done = _log_attempt(exp, record, plan, uri, name, settings.tracking_timeout, live=live, resume=True)
        except Exception as exc:  # noqa: BLE001 - any client/server failure is reported, never raised
            refusal = _error_text(exc)
    if refusal is not None:
        log.warning("%s: not logged to MLflow at %s (the run's outcome is unchanged): %s", exp.id, uri, refusal)
        exp.event("tracking_failed", mlflow_uri=uri, error=refusal)
        return None
    _record_tracked(exp, record, uri, name, done)
    log.info("%s: logged to MLflow at %s (run %s)", exp.id, uri, done["run_id"])
    return done["run_id"]


def _record_tracked(exp: Experiment, record: dict, uri: str, name: str, done: dict) -> None:
    artifacts = done.get("artifacts", "logged")
    if artifacts != "logged":  # the run's status and numbers are there; some of its files are not
        log.warning("%s: MLflow run %s: artifacts %s", exp.id, done["run_id"], artifacts)
    exp.event("tracked", attempt=record.get("attempt"), mlflow_uri=uri, mlflow_experiment=name,
              mlflow_experiment_id=done.get("experiment_id"), run_id=done["run_id"],
              url=run_url(uri, done.get("experiment_id"), done["run_id"]), artifacts=artifacts)  # fmt: skip


def run_url(uri: str, experiment_id: str | None, run_id: str) -> str | None:
    """The MLflow UI's page of a run: `<uri>/#/experiments/<experiment id>/runs/<run id>`."""
    if not experiment_id:
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def tracked_url(exp: Experiment, record: dict) -> str | None:
    """The URL of the MLflow run the attempt `record` was last logged to (its host events), else None."""
    url = None
    for event in exp.events():
        if event.get("event") == "tracked" and event.get("attempt") in (None, record.get("attempt")):
            url = event.get("url") if isinstance(event.get("url"), str) else None
    return url


def live_run_id(exp: Experiment, record: dict) -> str | None:
    """The MLflow run a live client created for the attempt `record` (its `tracking_started` event)."""
    found = None
    for event in exp.events():
        if event.get("event") == "tracking_started" and event.get("attempt") == record.get("attempt"):
            found = event
    return str(found["run_id"]) if found and isinstance(found.get("run_id"), str) else None


def track_again(exp: Experiment, record: dict, uri: str | None = None, experiment: str | None = None) -> dict:
    """`infra track`: log a finished attempt (again: a new MLflow run), to the plan's server or `uri`.

    Unlike the automatic logging, problems are errors: UsageError (exit 2) for an attempt that has
    not ended or nowhere to log to, EnvironmentProblem (exit 3) when the server cannot be reached or
    the plan's server is not in `tracking_hosts`. A `uri` given here is the invoker's own choice, so
    it needs no listing.
    """
    from pydantic import ValidationError

    from runner.errors import UsageError
    from runner.plan.models import TrackingSpec

    if record.get("state") not in TRACKED_STATES:
        raise UsageError(
            f"experiment {exp.id} is {record.get('state')}: only a succeeded, failed or cancelled attempt can be tracked"
        )
    plan = verified_plan(exp, record)
    if plan is None:
        raise UsageError(f"experiment {exp.id} has no config/plan.json to log")
    section = dict(plan.get("tracking") or {})
    if uri is not None:
        section["mlflow_uri"] = uri
    if experiment is not None:
        section["experiment"] = experiment
    if "mlflow_uri" not in section:
        raise UsageError(f"experiment {exp.id}'s plan has no tracking section: give --mlflow-uri")
    try:
        spec = TrackingSpec.model_validate(section)
    except ValidationError:
        raise UsageError(
            "--mlflow-uri: use http(s)://host[:port][/path] without user, password, query or fragment; "
            "--experiment: 1-256 printable characters"
        ) from None
    require_client(f"experiment {exp.id}", None if uri is not None else spec.mlflow_uri)
    if server_address(spec.mlflow_uri) is None:
        raise UsageError(f"--mlflow-uri {spec.mlflow_uri}: the server must be a plain host[:port]")
    name = spec.experiment or plan["name"]
    # the live run of an attempt never finished (its follower went away) is completed, not duplicated
    resume = uri is None and experiment is None and not _was_tracked(exp, record)
    try:
        done = _log_attempt(exp, record, plan, spec.mlflow_uri, name, node_settings().tracking_timeout, resume=resume)
    except Exception as exc:  # noqa: BLE001 - reported as the command's error
        error = _error_text(exc)
        exp.event("tracking_failed", mlflow_uri=spec.mlflow_uri, error=error)
        raise EnvironmentProblem(f"experiment {exp.id} not logged to MLflow at {spec.mlflow_uri}: {error}") from None
    _record_tracked(exp, record, spec.mlflow_uri, name, done)
    return {"experiment_id": exp.id, "mlflow_uri": spec.mlflow_uri, "mlflow_experiment": name,
            "run_id": done["run_id"], "mlflow_run_url": run_url(spec.mlflow_uri, done.get("experiment_id"),
                                                                  done["run_id"])}  # fmt: skip


def _was_tracked(exp: Experiment, record: dict) -> bool:
    return any(e.get("event") == "tracked" and e.get("attempt") in (None, record.get("attempt")) for e in exp.events())


def verified_plan(exp: Experiment, record: dict) -> dict | None:
    """The experiment's `config/plan.json` if it is the plan the host wrote (same sha256), else an error.

    The training can rewrite that file; the record (host-only) holds the hash of the resolved plan,
    whose only difference from the training's copy is `data.db` (the record's `db`).
    """
    try:
        doc = json.loads(safefs.read_bytes(exp.root, "config/plan.json", limit=safefs.DEFAULT_READ_LIMIT))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        raise safefs.Tampered(exp.root / "config/plan.json", "is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
        raise safefs.Tampered(exp.root / "config/plan.json", "is not a plan")
    host = {**doc, "data": {**doc["data"], "db": record.get("db")}}
    if plan_sha256(host) != record.get("plan_sha256"):
        raise safefs.Tampered(exp.root / "config/plan.json", "differs from the plan infra wrote (plan_sha256)")
    return doc


class ClientFailed(Exception):
    """The MLflow client's process failed or was stopped; the text says how (`Type: message`)."""


def _error_text(exc: Exception) -> str:
    text = str(exc) if isinstance(exc, ClientFailed) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:300]


def _log_attempt(
    exp: Experiment, record: dict, plan: dict, uri: str, experiment_name: str, timeout: int, live=None, resume=False
) -> dict:
    """Log one attempt in a child process given `timeout` seconds in all; {"run_id", "experiment_id"}.

    Everything is read from the experiment here (through safefs, capped); the child gets plain data
    in a private folder and only talks to the server. A thread could not be stopped in the middle of
    a read that a server answers one byte at a time; a process can be killed. `live`: the attempt's
    live client (it logs into its own run); `resume`: without one, log into the run a live client
    created for this attempt (its `tracking_started` event) when there is one.
    """
    started, ended = _attempt_times(record)
    end_ms = ended or int(time.time() * 1000)
    tags = run_tags(exp, record, live=False)
    metrics = [[k, v, end_ms, step] for step, k, v in epoch_metrics(exp)]
    metrics += [[k, v, end_ms, 0] for k, v in final_metrics(exp).items()]
    payload = {
        "uri": uri,
        "experiment": experiment_name,
        "tags": tags,
        "params": run_params(plan, record),
        "metrics": metrics,
        "tracked_by": f"infra {__version__}",
        "status": TRACKED_STATES[record["state"]],
        "timeout": timeout,
        "start_time": started,
        "end_time": ended,
        "run_id": live_run_id(exp, record) if resume and live is None else None,
    }
    # The files (artifacts, the model's) are copied by the client process itself, one at a time and
    # after the run's status is set: copying counts against the deadline and never delays the status.
    payload["files"] = {"exp_root": str(exp.root), "state": record["state"], "plan": plan}
    if live is not None:
        return live.finish(payload, timeout)
    with tempfile.TemporaryDirectory(prefix="infra-track-") as tmp:
        (Path(tmp) / "payload.json").write_text(json.dumps(payload), encoding="utf-8")
        return _run_client(Path(tmp), timeout)


def _attempt_times(record: dict) -> tuple[int | None, int | None]:
    """The attempt's start and end in ms since the epoch, from the (host-written) record."""
    from datetime import datetime

    out = []
    for key in ("started_at", "finished_at"):
        try:
            out.append(int(datetime.fromisoformat(str(record.get(key)).replace("Z", "+00:00")).timestamp() * 1000))
        except ValueError:
            out.append(None)
    return out[0], out[1]


def run_tags(exp: Experiment, record: dict, live: bool) -> dict[str, str]:
    """The run's tags; a live run's (made while the attempt runs) lack what only its end knows."""
    tags = {
        "mlflow.runName": exp.id,
        "infra.experiment_id": exp.id,
        "infra.attempt": str(record.get("attempt")),
        "infra.backend": str(record.get("backend")),
    }
    if live:
        return tags
    tags.update({"infra.state": record["state"], "infra.exit_code": str(record.get("exit_code"))})
    if kept := kept_tag(exp):
        tags["infra.kept"] = kept
    return tags


def _run_client(folder: Path, timeout: int) -> dict:
    """Run `_client_main` on `folder` and wait for its result at most `timeout` s after it is ready."""
    code = "import sys; from runner.run.tracking import _client_main; _client_main(sys.argv[1])"
    with (folder / "client.log").open("wb") as client_log:
        # -P and cwd: nothing importable from the caller's directory (a workdir) reaches the child
        proc = subprocess.Popen(
            [sys.executable, "-P", "-c", code, str(folder)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=client_log,
            cwd=folder,
        )
    try:
        return client_results(_Lines(proc.stdout), timeout, lambda: client_log_tail(folder))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        log.debug("MLflow client log: %s", (folder / "client.log").read_bytes()[-2000:])


def client_log_tail(folder: Path) -> str:
    try:
        return (folder / "client.log").read_bytes()[-600:].decode("utf-8", "replace").strip()[-300:]
    except OSError:
        return ""


def client_results(lines: _Lines, timeout: int, tail) -> dict:
    """The client's answers: "ready" (within CLIENT_START_S), then within `timeout` s of it the run's
    line (its status is set: {"run_id", "experiment_id"}) and the artifacts' line. ClientFailed when
    the run's line does not come; a missing artifacts' line is said in the result's "artifacts"."""
    if lines.next(time.monotonic() + CLIENT_START_S) != "ready":
        raise ClientFailed(f"ClientFailed: the MLflow client did not start: {tail()}")
    deadline = time.monotonic() + timeout
    gave_up = f"gave up after {timeout} s (tracking_timeout): the server did not finish answering"
    first = lines.next(deadline)
    if first is None and lines.eof:
        raise ClientFailed(f"ClientFailed: the MLflow client exited without a result: {tail()}")
    if first is None:
        raise ClientFailed(f"TimeoutError: {gave_up}")
    doc = json.loads(first)
    if "run_id" not in doc:
        raise ClientFailed(str(doc.get("error")))
    second = lines.next(deadline)
    if second is None:
        why = f"the client exited: {tail()}" if lines.eof else gave_up
        doc["artifacts"] = f"not all logged: {why}"
    else:
        end = json.loads(second)
        doc["artifacts"] = "logged" if "error" not in end else f"not all logged: {end['error']}"
    return doc


class _Lines:
    """Lines of a child's pipe, each waited for until an absolute deadline (None at the deadline or EOF)."""

    def __init__(self, pipe):
        self.fd = pipe.fileno()
        self.buffer = b""
        self.eof = False

    def next(self, deadline: float) -> str | None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.fd, selectors.EVENT_READ)
            while b"\n" not in self.buffer:
                left = deadline - time.monotonic()
                if left <= 0 or len(self.buffer) > RESULT_LINE_LIMIT or not selector.select(left):
                    return None
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    self.eof = True
                    return None
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode("utf-8", "replace")


def _open_client(uri: str):
    """An MlflowClient for `uri` with bounded requests (the node's own MLFLOW_HTTP_* choice wins)."""
    # MLflow's client retries 7 times over minutes by default
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(REQUEST_TIMEOUT_S))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(REQUEST_RETRIES))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ["MLFLOW_UV_AUTO_DETECT"] = "false"  # save_model must not run `uv export` in our folder
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _client_main(folder: str) -> None:
    """The MLflow client's process: log `folder/payload.json`, print "ready", then one JSON result line.

    Its stdout is the result pipe only: the client's own prints ("View run …") go to /dev/null.
    """
    result = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    payload = json.loads((Path(folder) / "payload.json").read_text(encoding="utf-8"))
    client = _open_client(payload["uri"])
    say = _sayer(result)
    say("ready")
    signal.alarm(int(payload["timeout"]) + 10)  # ends this process should its parent be gone
    send_and_say(client, payload, Path(folder), say, run_id=payload.get("run_id"))


def _sayer(pipe):
    def say(line: str) -> None:
        pipe.write(line + "\n")
        pipe.flush()

    return say


def send_and_say(client, payload: dict, folder: Path, say, **run) -> None:
    """`_send`, its two result lines said on the result pipe (an error as {"error"} in place of the line due)."""
    sent = False

    def terminated(doc: dict) -> None:
        nonlocal sent
        say(json.dumps(doc))
        sent = True

    try:
        _send(client, payload, folder, on_terminated=terminated, **run)
        doc = {"artifacts": "logged"}
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        doc = {"error": _error_text(exc)}
        if sent:  # the run's status is set; only its files are incomplete
            print(f"artifacts: {doc['error']}", file=sys.stderr, flush=True)
    say(json.dumps(doc))


def _experiment_id(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created meanwhile by another finalising runner
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _send(client, payload: dict, folder: Path, run_id=None, experiment_id=None, logged=None, on_terminated=None):
    """Log `payload` into run `run_id` (a live run: `logged` holds what it already has) or a new run.

    Params, metrics and tags first, then the run's status and end time (`on_terminated` gets
    {"run_id", "experiment_id"} then), and only then the files: copied from the experiment one at a
    time and uploaded (MLflow takes artifacts and tags on a finished run). A big upload that runs out
    of time costs the files, never the run's final status.
    """
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException

    if run_id is not None and experiment_id is None:  # a live run whose follower went away
        try:
            found = client.get_run(run_id)
        except MlflowException:  # removed from the server meanwhile: a new run
            run_id = None
        else:
            experiment_id = found.info.experiment_id
            logged = {(m.key, m.step): m.value for key in {m[0] for m in payload["metrics"]}
                      for m in client.get_metric_history(run_id, key)}  # fmt: skip
    if run_id is None:
        experiment_id = _experiment_id(client, payload["experiment"])
        run_id = client.create_run(experiment_id, start_time=payload["start_time"], tags=payload["tags"]).info.run_id
    else:
        client.log_batch(run_id, tags=[_tag(k, v) for k, v in payload["tags"].items()])
    logged = logged or {}
    for chunk in _chunks([Param(k, v) for k, v in payload["params"].items()], PARAMS_PER_BATCH):
        client.log_batch(run_id, params=chunk)
    metrics = [Metric(*m) for m in payload["metrics"] if logged.get((m[0], m[3])) != m[1]]
    for chunk in _chunks(metrics, METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk)
    client.log_batch(run_id, tags=[_tag("infra.tracked_by", payload["tracked_by"]),
                                   _tag("infra.artifacts_logged", ARTIFACTS_PENDING)])  # fmt: skip
    client.set_terminated(run_id, status=payload["status"], end_time=payload.get("end_time"))
    if on_terminated is not None:
        on_terminated({"run_id": run_id, "experiment_id": experiment_id})
    _send_files(client, run_id, payload["files"], folder)


def _send_files(client, run_id: str, files: dict, folder: Path) -> None:
    """Copy each artifact (then the model's files) into `folder`, upload it, remove the copy; the tags
    that say what was logged last."""
    exp = Experiment(Path(files["exp_root"]))
    skipped: list[str] = []
    for copy, artifact_path in each_artifact(exp, folder / "files", skipped):
        try:
            client.log_artifact(run_id, str(copy), artifact_path=artifact_path)
        finally:
            copy.unlink(missing_ok=True)
    model, why_not = model_source(exp, {"state": files["state"]}, files["plan"], folder / "model-src")
    if model:
        client.log_artifacts(run_id, _save_model(folder, model), artifact_path="model")
    tags = {"infra.model_logged": "yes" if model else f"no: {why_not}", "infra.artifacts_logged": "yes"}
    if skipped:
        tags["infra.artifacts_skipped"] = "; ".join(skipped)[:PARAM_VALUE_LIMIT]
    client.log_batch(run_id, tags=[_tag(k, v) for k, v in tags.items()])


def _tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, value)


def _save_model(folder: Path, model: dict) -> str:
    """Save the experiment's files as an MLflow pyfunc model (models from code: the wrapper file is
    infra's own, runner/core/mlflow_model.py); the folder to log. No requirement is inferred: that
    would load the model (torch, the checkpoint) in this process's child."""
    import mlflow.pyfunc

    out = folder / "model"
    mlflow.pyfunc.save_model(
        str(out),
        python_model=model["code"],
        artifacts={"experiment": str(folder / "model-src")},
        pip_requirements=model["requirements"],
    )
    return str(out)


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def flatten(doc: dict) -> dict[str, str]:
    """`{"train": {"lr": 0.001}}` → `{"train.lr": "0.001"}`: compare's bounded flattener, as MLflow's text."""
    from runner.run.compare import flatten as flatten_plan

    flat = flatten_plan(doc, max_text=PARAM_VALUE_LIMIT)
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in flat.items()}


def run_params(plan: dict, record: dict) -> dict[str, str]:
    """The resolved plan, flattened (tracking itself left out), plus where and what ran."""
    params = flatten({k: v for k, v in plan.items() if k != "tracking"})
    params.update(
        {
            "infra.experiment_id": str(record.get("experiment_id")),
            "infra.image": str(record.get("image")),
            "infra.image_id": str(record.get("image_id")),
            "infra.version": str(record.get("infra_version")),
            "infra.host": str(record.get("host")),
        }
    )
    container_db = params.get("data.db")
    host_db = record.get("db")
    if isinstance(host_db, str):  # the host's file, as the record (host-only) names it
        params["data.db"] = host_db[:PARAM_VALUE_LIMIT]
        if container_db and container_db != host_db:
            params["data.db_in_run"] = container_db
    # hashed by the host when the attempt started (`launch.open_attempt`), never here: whoever
    # finalises (even `infra status`) must not read a database of gigabytes
    if isinstance(record.get("db_sha256"), str):
        params["data.db_sha256"] = record["db_sha256"][:PARAM_VALUE_LIMIT]
    return params


_DB_HASHES: dict[tuple, str] = {}


def db_sha256(path: Path) -> str:
    """The sha256 of the database file, or why there is none; called when an attempt of a tracked plan
    starts (the record's `db_sha256`). Computed once per file version in this process (a study's points
    share it; keyed by device, inode, size and mtime) and only up to `DB_HASH_LIMIT` bytes: a bigger
    file is named by its size instead of read for minutes."""
    try:
        st = path.stat()
    except OSError as exc:
        return f"not computed: {exc.strerror}"
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _DB_HASHES:
        return _DB_HASHES[key]
    if st.st_size > DB_HASH_LIMIT:
        return f"not computed: {st.st_size} bytes, more than the {DB_HASH_LIMIT} bytes infra hashes"
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        return f"not computed: {exc.strerror}"
    _DB_HASHES[key] = digest.hexdigest()
    return _DB_HASHES[key]


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def epoch_values(doc) -> list[tuple[int, str, float]]:
    """(epoch, name, value) of one untrusted epoch record: an object with an integer `epoch`, plain
    names, finite numbers (`val: {m: x}` as `val_m`); nothing for anything else."""
    epoch = doc.get("epoch") if isinstance(doc, dict) else None
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch < MAX_EPOCHS_LOGGED:
        return []
    values = {k: doc[k] for k in doc if k not in ("epoch", "step")}
    nested = values.pop("val", None)
    if isinstance(nested, dict):
        for k, v in nested.items():
            values.setdefault(f"val_{k}", v)
    out = []
    for name, value in values.items():
        number = _number(value)
        if number is not None and NAME_RE.match(str(name)):
            out.append((epoch, str(name), number))
            if len(out) >= MAX_NAMES_PER_EPOCH:
                break
    return out


def epoch_metrics(exp: Experiment) -> list[tuple[int, str, float]]:
    """(epoch, name, value) from metrics/metrics.jsonl: plain names, finite numbers, the last line per epoch.

    Untrusted: lines that are not objects with an integer `epoch` are skipped, the file is capped, and
    so are the names per epoch and the values in all (`MAX_METRIC_VALUES`: the earliest epochs kept).
    """
    try:
        data = safefs.read_bytes(exp.root, "metrics/metrics.jsonl", limit=METRICS_LINES_LIMIT)
    except FileNotFoundError:
        return []
    by_epoch: dict[int, list] = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            values = epoch_values(json.loads(line))
        except ValueError:
            continue
        if values:
            by_epoch[values[0][0]] = values  # a resumed attempt repeats an epoch: its last record holds
    return [value for epoch in sorted(by_epoch) for value in by_epoch[epoch]][:MAX_METRIC_VALUES]


def final_metrics(exp: Experiment) -> dict[str, float]:
    """`test_<m>` and `best_val_<m>` (the best checkpoint's validation metrics) from metrics/metrics.json."""
    summary = metrics_summary(exp.root)
    out = {}
    for section, prefix in (("test", "test_"), ("val", "best_val_")):
        for name, value in summary.get(section, {}).items():
            number = _number(value)
            if number is not None and NAME_RE.match(name):
                out[f"{prefix}{name}"] = number
    doc = exp.read_json("metrics/metrics.json")
    for key in ("training_seconds", "samples_per_second", "best_epoch", "epochs"):
        number = _number(doc.get(key))
        if number is not None:
            out[key] = number
    return out


def kept_tag(exp: Experiment) -> str | None:
    """`infra.kept`: which model the run delivers, from metrics.json's `kept` (untrusted: only its known
    words and a plain epoch number pass): "start", "closed_form", or "epoch N" with N 0-based, the MLflow
    step of that epoch's metrics. None when the core did not say."""
    kept = exp.read_json("metrics/metrics.json").get("kept")
    model = kept.get("model") if isinstance(kept, dict) else None
    if model in ("start", "closed_form"):
        return model
    epoch = kept.get("epoch") if model == "epoch" else None
    if isinstance(epoch, int) and not isinstance(epoch, bool) and 0 <= epoch < MAX_EPOCHS_LOGGED:
        return f"epoch {epoch}"
    return None


def plots(exp: Experiment):
    """The PNGs of artifacts/visualization (plain names, PNG content, capped count and size), one at a
    time: (name, content)."""
    try:
        with safefs.open_dir(exp.root, "artifacts/visualization") as dfd:
            names = sorted(os.listdir(dfd))
    except FileNotFoundError:
        return
    found = 0
    for name in names:
        if not PLOT_NAME_RE.match(name) or found >= MAX_PLOTS:
            continue
        try:
            data = safefs.read_bytes(exp.root, f"artifacts/visualization/{name}", limit=PLOT_LIMIT)
        except (FileNotFoundError, safefs.Tampered, safefs.TooLarge) as exc:
            log.warning("%s: plot %s not logged: %s", exp.id, name, exc)
            continue
        if data.startswith(PNG_MAGIC):
            found += 1
            yield name, data


class NotACheckpoint(InfraError):
    """A file under ckpts/ that does not begin as torch.save's output does."""


def _copy_capped(exp: Experiment, rel: str, dest: Path, limit: int, magic: tuple[bytes, ...] = ()) -> None:
    """Copy the regular file `exp.root/rel` to `dest` (links refused), streaming; TooLarge past `limit`,
    NotACheckpoint when `magic` is given and the file begins with none of it."""
    with safefs.open_read(exp.root, rel) as src:
        size = os.fstat(src.fileno()).st_size
        if size > limit:
            raise safefs.TooLarge(f"{rel}: {size} bytes, more than the {limit} bytes logged")
        if magic and not src.read(4).startswith(magic):
            raise NotACheckpoint(f"{rel}: not a checkpoint (neither a zip archive nor a pickle)")
        src.seek(0)
        dest.parent.mkdir(parents=True, exist_ok=True)
        copied = 0
        try:
            with dest.open("wb") as out:
                while chunk := src.read(min(1 << 20, limit + 1 - copied)):
                    copied += len(chunk)
                    if copied > limit:  # grew while being read
                        raise safefs.TooLarge(f"{rel}: more than the {limit} bytes logged")
                    out.write(chunk)
        except BaseException:
            dest.unlink(missing_ok=True)  # no partial copy left for anyone to upload
            raise


def each_artifact(exp: Experiment, dest: Path, skipped: list[str]):
    """Copy the files logged as artifacts into `dest`, one at a time: (the copy, its artifact folder).
    The caller uploads and removes each copy before the next is made, so the copies never take more
    room than the largest file.

    Missing files are left out; a file that is not regular or too large is skipped with a warning and
    named in `skipped`.
    """
    for rel, folder, limit in ARTIFACT_FILES:
        copy = dest / folder / rel.rsplit("/", 1)[-1]
        try:
            _copy_capped(exp, rel, copy, limit)
        except FileNotFoundError:
            continue
        except (safefs.Tampered, safefs.TooLarge, OSError) as exc:
            copy.unlink(missing_ok=True)
            reason = getattr(exc, "message", None) or str(exc)
            log.warning("%s: %s not logged to MLflow: %s", exp.id, rel, reason)
            skipped.append(f"{rel}: {reason}")
            continue
        yield copy, folder
    for name, data in plots(exp):
        (dest / "plots").mkdir(parents=True, exist_ok=True)
        (dest / "plots" / name).write_bytes(data)
        yield dest / "plots" / name, "plots"


def model_files() -> tuple[str, ...] | None:
    """`MODEL_FILES` of runner/core/mlflow_model.py, read from its source (the host imports no core
    module): a tuple of strings, names of the module's other string/tuple constants and `*NAME`s
    resolved; None when the file or the constant is missing or not that plain."""
    try:
        tree = ast.parse(MODEL_CODE.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None
    known: dict[str, object] = {}

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name) and node.id in known:
            return known[node.id]
        if isinstance(node, ast.Tuple | ast.List):
            out: list[str] = []
            for item in node.elts:
                inner = value(item.value if isinstance(item, ast.Starred) else item)
                out += list(inner) if isinstance(item, ast.Starred) and isinstance(inner, tuple) else [inner]
            return tuple(out) if all(isinstance(x, str) for x in out) else None
        return None

    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            known[node.targets[0].id] = value(node.value)
    files = known.get("MODEL_FILES")
    return files if isinstance(files, tuple) and files else None


def model_requirements() -> list[str]:
    """What the model needs to be loaded: infra's `core` extra, as installed here (markers dropped)."""
    import importlib.metadata

    try:
        requires = importlib.metadata.requires("infra") or []
    except importlib.metadata.PackageNotFoundError:
        requires = []
    core = [r.split(";", 1)[0].strip() for r in requires if 'extra == "core"' in r]
    return core or ["torch", "lightning", "numpy", "pandas", "pyarrow"]


def model_source(exp: Experiment, record: dict, plan: dict, dest: Path) -> tuple[dict | None, str]:
    """Copy what the MLflow model needs into `dest`; ({"code", "requirements"}, "") or (None, why not)."""
    if record.get("state") != "succeeded":
        return None, f"the attempt {record.get('state')}"
    for section, names in BUILTIN.items():
        name = (plan.get(section) or {}).get("name") if isinstance(plan.get(section), dict) else None
        if name == "plm":
            return None, "the plm embedding needs the node's model store"
        if name is not None and name not in names:
            return None, f"{section} {str(name)[:64]!r} is a workdir plugin (its code is not part of infra)"
    files = model_files()
    if files is None:
        return None, f"the MLflow model wrapper {MODEL_CODE.name} is not installed with this infra"
    copied = []
    for rel in files:
        if rel.startswith("ckpts/") and any(c.startswith("ckpts/") for c in copied):
            continue  # one checkpoint: the first listed that exists (best, else last), as `infra predict`
        try:
            _copy_capped(exp, rel, dest / rel, MODEL_FILE_LIMIT, CHECKPOINT_MAGIC if rel.startswith("ckpts/") else ())
        except FileNotFoundError:
            continue
        except (safefs.Tampered, safefs.TooLarge, NotACheckpoint, OSError) as exc:
            return None, f"{rel}: {getattr(exc, 'message', None) or exc}"
        copied.append(rel)
    if "config/predict.json" not in copied or not any(rel.startswith("ckpts/") for rel in copied):
        return None, "the experiment has no config/predict.json or checkpoint"
    return {"code": str(MODEL_CODE), "requirements": model_requirements()}, ""
