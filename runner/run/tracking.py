"""Logging a finished attempt to an MLflow tracking server, from the host (docs/tracking.md).

Called once per attempt, by whoever finalised it (`runner.run.backends`: the foreground runner, a
queue worker, or the `infra status`/`ls` reader that reconciled a detached run), after the final
state is on record. The container never talks to the server: its network stays `none`.

Everything read here comes from the experiment's mounted folders, i.e. from the training: the plan
is used only when it hashes to the record's `plan_sha256` (so the server the host contacts is the
one the host's plan named), numbers must be finite, names plain, sizes and counts capped, and files
are read through `runner.safefs`. A server that is unreachable or refuses anything costs a bounded
time, one warning and a `tracking_failed` event; it never changes the run's state or exit code.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import math
import os
import re
import tempfile
import time
from pathlib import Path

from runner import __version__, safefs
from runner.errors import EnvironmentProblem, InfraError
from runner.run.records import Experiment, metrics_summary, plan_sha256

log = logging.getLogger(__name__)

TRACKED_STATES = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}
# MLflow's client retries 7 times over minutes by default; a finished run must not wait on that.
REQUEST_TIMEOUT_S = 10
REQUEST_RETRIES = 1
BUDGET_S = 60  # all requests of one attempt together; checked between requests
METRICS_LINES_LIMIT = 16 << 20  # metrics.jsonl read back at most
MAX_EPOCHS_LOGGED = 100_000
MAX_PLOTS = 32
PLOT_LIMIT = 32 << 20
PARAM_VALUE_LIMIT = 500
PARAMS_PER_BATCH = 100  # MLflow's log_batch limits: 100 params, 1000 metrics per request
METRICS_PER_BATCH = 1000
NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
PLOT_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,100}\.png$")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def client_installed() -> bool:
    """Whether the MLflow client can be imported here (found without importing it: plan loading stays fast)."""
    try:
        return importlib.util.find_spec("mlflow") is not None
    except (ImportError, ValueError):  # a broken or blocked install is no client either
        return False


def require_client(source: str) -> None:
    """EnvironmentProblem (exit 3) when a plan asks for tracking and this host lacks the MLflow client."""
    if not client_installed():
        raise EnvironmentProblem(
            f"{source}: tracking.mlflow_uri needs the MLflow client on this host: "
            "pip install 'infra[tracking]' (or remove the plan's tracking section)"
        )


def track_finished(exp: Experiment, record: dict) -> str | None:
    """Log the finished attempt `record` of `exp` when its plan has a tracking section; the MLflow run id.

    Never raises for a tracking problem: it is reported as a warning and a `tracking_failed` event.
    """
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
        run_id = _log_attempt(exp, record, plan, uri, name)
    except Exception as exc:  # noqa: BLE001 - any client/server failure is reported, never raised
        error = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        log.warning("%s: not logged to MLflow at %s (the run's outcome is unchanged): %s", exp.id, uri, error)
        exp.event("tracking_failed", mlflow_uri=uri, error=error)
        return None
    exp.event("tracked", mlflow_uri=uri, mlflow_experiment=name, run_id=run_id)
    log.info("%s: logged to MLflow at %s (run %s)", exp.id, uri, run_id)
    return run_id


def track_again(exp: Experiment, record: dict, uri: str | None = None, experiment: str | None = None) -> dict:
    """`infra track`: log a finished attempt (again: a new MLflow run), to the plan's server or `uri`.

    Unlike the automatic logging, problems are errors: UsageError (exit 2) for an attempt that has
    not ended or nowhere to log to, EnvironmentProblem (exit 3) when the server cannot be reached.
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
    require_client(f"experiment {exp.id}")
    name = spec.experiment or plan["name"]
    try:
        run_id = _log_attempt(exp, record, plan, spec.mlflow_uri, name)
    except Exception as exc:  # noqa: BLE001 - reported as the command's error
        error = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        exp.event("tracking_failed", mlflow_uri=spec.mlflow_uri, error=error)
        raise EnvironmentProblem(f"experiment {exp.id} not logged to MLflow at {spec.mlflow_uri}: {error}") from None
    exp.event("tracked", mlflow_uri=spec.mlflow_uri, mlflow_experiment=name, run_id=run_id)
    return {"experiment_id": exp.id, "mlflow_uri": spec.mlflow_uri, "mlflow_experiment": name, "run_id": run_id}


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


@contextlib.contextmanager
def _bounded_requests():
    """MLflow's HTTP timeout and retries made small for the duration (its client reads them per request)."""
    wanted = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT_S),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(REQUEST_RETRIES),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update({k: v for k, v in wanted.items() if saved[k] is None})  # the node's own choice wins
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


class _Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise TimeoutError(f"gave up after {BUDGET_S}s")


def _log_attempt(exp: Experiment, record: dict, plan: dict, uri: str, experiment_name: str) -> str:
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    deadline = _Deadline(BUDGET_S)
    # the client prints "View run" links to stdout, which is `--json`'s one document: keep them off it
    with _bounded_requests(), contextlib.redirect_stdout(io.StringIO()):
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment_name)
        if found is None:
            try:
                experiment_id = client.create_experiment(experiment_name)
            except MlflowException:  # created meanwhile by another finalising runner
                found = client.get_experiment_by_name(experiment_name)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        else:
            experiment_id = found.experiment_id
        deadline.check()
        tags = {
            "mlflow.runName": exp.id,
            "infra.experiment_id": exp.id,
            "infra.state": record["state"],
            "infra.attempt": str(record.get("attempt")),
            "infra.backend": str(record.get("backend")),
            "infra.exit_code": str(record.get("exit_code")),
        }
        if kept := kept_tag(exp):
            tags["infra.kept"] = kept
        run = client.create_run(experiment_id, tags=tags)
        run_id = run.info.run_id
        params = run_params(plan, record)
        for chunk in _chunks([Param(k, v) for k, v in params.items()], PARAMS_PER_BATCH):
            deadline.check()
            client.log_batch(run_id, params=chunk)
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for step, k, v in epoch_metrics(exp)]
        metrics += [Metric(k, v, now, 0) for k, v in final_metrics(exp).items()]
        for chunk in _chunks(metrics, METRICS_PER_BATCH):
            deadline.check()
            client.log_batch(run_id, metrics=chunk)
        with tempfile.TemporaryDirectory(prefix="infra-track-") as tmp:
            for name, data in plots(exp):
                deadline.check()
                path = Path(tmp) / name
                path.write_bytes(data)
                client.log_artifact(run_id, str(path), artifact_path="plots")
        deadline.check()
        client.set_tag(run_id, "infra.tracked_by", f"infra {__version__}")
        client.set_terminated(run_id, status=TRACKED_STATES[record["state"]])
    return run_id


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
    return params


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def epoch_metrics(exp: Experiment) -> list[tuple[int, str, float]]:
    """(epoch, name, value) from metrics/metrics.jsonl: plain names, finite numbers, the last line per epoch.

    Untrusted: lines that are not objects with an integer `epoch` are skipped, the file is capped.
    """
    try:
        data = safefs.read_bytes(exp.root, "metrics/metrics.jsonl", limit=METRICS_LINES_LIMIT)
    except FileNotFoundError:
        return []
    by_epoch: dict[int, dict] = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        epoch = doc.get("epoch") if isinstance(doc, dict) else None
        if isinstance(epoch, int) and not isinstance(epoch, bool) and 0 <= epoch < MAX_EPOCHS_LOGGED:
            by_epoch[epoch] = doc  # a resumed attempt repeats an epoch: its last record holds
    out = []
    for epoch in sorted(by_epoch):
        doc = by_epoch[epoch]
        values = {k: doc[k] for k in doc if k not in ("epoch", "step")}
        nested = values.pop("val", None)
        if isinstance(nested, dict):
            for k, v in nested.items():
                values.setdefault(f"val_{k}", v)
        for name, value in values.items():
            number = _number(value)
            if number is not None and NAME_RE.match(str(name)):
                out.append((epoch, str(name), number))
    return out


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


def plots(exp: Experiment) -> list[tuple[str, bytes]]:
    """The PNGs of artifacts/visualization (plain names, PNG content, capped count and size)."""
    try:
        with safefs.open_dir(exp.root, "artifacts/visualization") as dfd:
            names = sorted(os.listdir(dfd))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if not PLOT_NAME_RE.match(name) or len(out) >= MAX_PLOTS:
            continue
        try:
            data = safefs.read_bytes(exp.root, f"artifacts/visualization/{name}", limit=PLOT_LIMIT)
        except (FileNotFoundError, safefs.Tampered, safefs.TooLarge) as exc:
            log.warning("%s: plot %s not logged: %s", exp.id, name, exc)
            continue
        if data.startswith(PNG_MAGIC):
            out.append((name, data))
    return out
