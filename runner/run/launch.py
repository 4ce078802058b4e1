"""The run path shared by `infra run`, studies, the queue worker and the demo: plan → experiment → training.

    LoadedPlan (typed, validated by the caller) → backend.prepare (image / pre-flight) → experiment id
    → lock → idempotency decision → layout + record + config/plan.json → backend.start → follow
    (foreground) or return (detach) → final state.

The plan is serialised once, here, into the experiment's canonical `config/plan.json` (with the
host's database path; the core job says where the core finds the file). The training core reads
that file and nothing else. Both backends start the training detached from this process, so a
runner killed with SIGKILL leaves a run that `infra status` can still reconcile. Ctrl-C stops the
training gracefully and records `cancelled`. Studies (`runner.run.study`) use the same decision and
attempt functions for each point, then hand the point to a slot instead of `backend.start`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from runner import safefs
from runner.errors import EXIT_OK, EnvironmentProblem, ExperimentFailed, Interrupted, UsageError
from runner.plan.load import LoadedPlan
from runner.plan.models import GpuRequest
from runner.run.backends import Backend, backend_of
from runner.run.jobs import Limits, core_error, train_job
from runner.run.records import (
    ACTIVE,
    ID_EXCLUDED_KEYS,
    MOUNTED_DIRS,
    Experiment,
    canonical_json,
    derive_experiment_id,
    experiments_root,
    new_record,
    now_iso,
    plan_sha256,
)
from runner.run.spec import LABEL_ATTEMPT, LABEL_PLAN
from runner.settings import NodeSettings, node_settings
from runner.workdir.known import remember as remember_workdir

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 600
BUILD_LOG = "build.log"  # the image build output of the experiment's last build, host-only
BUILD_LOG_LIMIT = 4 << 20


@dataclass
class RunOptions:
    backend: Backend
    gpus: GpuRequest | None = None  # --gpus, parsed; None keeps resources.gpus
    detach: bool = False
    rerun: bool = False
    stop_timeout: int = 60
    on_log: Callable[[str], None] = field(default=lambda line: None)  # training output lines
    on_event: Callable[[dict], None] = field(default=lambda event: None)  # state changes for --events
    on_build_log: Callable[[str], None] | None = None  # image build output lines; None: to on_log
    # Phases the `--events` stream does not carry (it stays as documented): {"phase": "image", …}
    on_phase: Callable[[dict], None] = field(default=lambda phase: None)


@dataclass
class RunOutcome:
    experiment_id: str
    exp_dir: Path
    record: dict
    exit_code: int
    reused: bool = False  # already succeeded: reported, not rerun
    attached: bool = False  # the experiment was already running; we followed it

    def to_dict(self) -> dict:
        keys = ("state", "attempt", "backend", "container_id", "image", "image_id", "exit_code", "message")
        return {
            "experiment_id": self.experiment_id,
            "exp_dir": str(self.exp_dir),
            **{k: self.record.get(k) for k in keys},
            "reused": self.reused,
            "attached": self.attached,
        }


def plan_gpus(loaded: LoadedPlan, override: GpuRequest | None) -> GpuRequest:
    """The GPU request of a run: `--gpus` over the plan's `resources.gpus` (both parsed once)."""
    return override if override is not None else GpuRequest.parse(loaded.plan.resources.gpus, "resources.gpus")


def preflight_paths(db: Path, workdir: Path, settings: NodeSettings) -> None:
    """Checks that need no engine: the DB readable, the workdir writable, enough disk."""
    if not os.access(db, os.R_OK):
        raise EnvironmentProblem(f"database {db} is not readable by this user; fix its permissions")
    root = experiments_root(workdir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot create {root}: {exc.strerror}; make the workdir writable") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise EnvironmentProblem(f"{root} is not writable by this user; fix its permissions or choose another workdir")
    free = shutil.disk_usage(root).free
    if free < settings.min_free_bytes:
        raise EnvironmentProblem(
            f"only {free / 2**30:.2f} GiB free under {root}; free space "
            f"(need {settings.min_free_bytes / 2**30:.2f} GiB, INFRA_MIN_FREE_BYTES)"
        )
    remember_workdir(workdir)  # `infra prune --images` in any workdir keeps the images this one's runs need


@dataclass(frozen=True)
class Target:
    """One experiment about to run: its resolved plan (the id filled in) and where it lives."""

    loaded: LoadedPlan
    resolved: dict
    exp: Experiment
    db: Path
    workdir: Path
    gpus: GpuRequest
    weights: str | None = None  # the plm model's content hash (runner.modelstore), else None

    @classmethod
    def of(cls, loaded: LoadedPlan, workdir: Path, image_hash: str | None, gpus: GpuRequest) -> Target:
        from runner.modelstore import plan_weights

        resolved = loaded.plan.model_dump(mode="json")
        exp_id = derive_experiment_id(resolved, image_hash) if image_hash else resolved.get("experiment_id")
        resolved["experiment_id"] = exp_id
        root = experiments_root(workdir) / (exp_id or f"{loaded.plan.name}-<id after the build>")
        weights = plan_weights(resolved)
        return cls(loaded, resolved, Experiment(root), Path(loaded.plan.data.db), workdir, gpus, weights)

    @property
    def plan_sha(self) -> str:
        return plan_sha256(self.resolved)

    def job(self, attempt: int, threads: int | None = None, dry: bool = False):
        """The training core job of one attempt (the image is filled in by the backend); `dry` creates
        nothing (the embedding cache folder of a plm plan)."""
        from runner.run.jobs import plm_places
        from runner.run.spec import workdir_identity

        return train_job(
            experiment_id=self.exp.id,
            exp_root=self.exp.root,
            db=self.db,
            workdir=self.workdir,
            output_dirs=MOUNTED_DIRS,
            gpus=self.gpus,
            limits=Limits.from_resources(self.loaded.plan.resources, threads),
            labels={LABEL_ATTEMPT: str(attempt), LABEL_PLAN: self.plan_sha},
            name=f"infra-{self.exp.id}-{workdir_identity(self.workdir)[:8]}",
            models=plm_places([self.loaded.plan], self.workdir, create=not dry),
        )


def run(loaded: LoadedPlan, workdir: Path, opts: RunOptions) -> RunOutcome:
    """Run (or report, attach to, resume) the experiment of a validated plan. See the module docstring."""
    settings = node_settings()
    if opts.stop_timeout < 0:
        raise UsageError(f"--stop-timeout {opts.stop_timeout}: must be 0 or more seconds")
    backend = opts.backend
    plan = loaded.plan
    if plan.tracking is not None:  # checked where the run happens: a Master that only submits needs no client
        from runner.run.tracking import require_client

        require_client(loaded.source, plan.tracking.mlflow_uri)
    gpus = plan_gpus(loaded, opts.gpus)
    preflight_paths(Path(plan.data.db), workdir, settings)
    build_log = BuildLog(opts.on_log if opts.on_build_log is None else opts.on_build_log)
    prepared = backend.prepare(workdir, gpus, build_log.add)
    if prepared.image_tag is not None:
        opts.on_phase({"phase": "image", "tag": prepared.image_tag, "reused": prepared.image_id is not None})
    if prepared.image_id is not None or prepared.image_tag is None:  # an image to ask (or the host's core)
        check_components([loaded], workdir, backend, prepared, build_log.add)
    target = Target.of(loaded, workdir, prepared.image_hash, gpus)
    exp = target.exp
    exp.lock_path.parent.mkdir(parents=True, exist_ok=True)

    with FileLock(str(exp.lock_path), timeout=LOCK_TIMEOUT_S):
        previous = decide(target, backend, opts.rerun)
        if previous and previous["state"] == "succeeded" and not opts.rerun:
            opts.on_event({"event": "reused", "experiment_id": exp.id, "state": "succeeded"})
            return RunOutcome(exp.id, exp.root, previous, EXIT_OK, reused=True)
        attach = bool(previous and previous["state"] in ACTIVE)
        if not attach:
            record = open_attempt(target, backend.name, previous, opts.rerun, opts.on_event)
            try:
                record = backend.start(
                    exp, target.job(record["attempt"]), prepared, _set_state(exp, opts), build_log.add
                )
            except BaseException as exc:
                fail_attempt(exp, exc)
                raise
            finally:
                build_log.save(exp)  # a failed build's whole log is what its user needs most
    if attach:
        opts.on_event({"event": "attached", "experiment_id": exp.id, "state": previous["state"]})
        if opts.detach:
            return RunOutcome(exp.id, exp.root, previous, EXIT_OK, attached=True)
        return follow(exp, backend, opts, attached=True)
    if opts.detach:
        return RunOutcome(exp.id, exp.root, record, EXIT_OK)
    return follow(exp, backend, opts)


def check_components(plans: list[LoadedPlan], workdir: Path, backend, prepared, on_log, labels=None) -> None:
    """PlanError (exit 2) naming every unknown component (with "did you mean") or parameter, before
    anything is created: checked against what the image registers (runner.workdir.components)."""
    from runner.errors import PlanError
    from runner.workdir.components import check_plans, components

    issues = check_plans([lp.plan for lp in plans], components(workdir, backend, prepared, on_log), labels)
    if issues:
        raise PlanError(plans[0].source, issues)


def decide(target: Target, backend: Backend, rerun: bool) -> dict | None:
    """The experiment's reconciled record before a new attempt (None when it does not exist yet).

    An id that already holds another plan is refused (exit 2) unless `rerun` replaces it (a finished
    experiment only): reporting, attaching to or resuming it would hand this plan another plan's
    result or checkpoint.
    """
    from runner.run.reconcile import reconcile

    if not target.exp.exists():
        return None
    previous = reconcile(target.exp, backend)
    if not rerun or previous.get("state") in ACTIVE:  # --rerun does not replace a running experiment:
        refuse_other_plan(target, previous)  # it would attach to it and report the other plan's result
    return previous


def refuse_other_plan(target: Target, previous: dict) -> None:
    """UsageError (exit 2) when the experiment's existing attempt ran a plan that computes something
    else than this one. Keys that only say where it runs or reports (`ID_EXCLUDED_KEYS`) may differ;
    the old plan is read from `config/plan.json` only when it hashes to the host's record. Other
    weights of its plm model (re-added under the same name) are another plan too."""
    if previous.get("model_sha256") != target.weights:
        raise UsageError(
            f"experiment_id {target.exp.id!r} ran with other weights of model "
            f"{target.resolved.get('embeddings', {}).get('params', {}).get('model')!r} (sha256 "
            f"{str(previous.get('model_sha256'))[:12]}, now {str(target.weights)[:12]}): choose another "
            "experiment_id, leave it out to derive one, or pass --rerun to replace that experiment"
        )
    if previous.get("plan_sha256") == target.plan_sha:
        return
    old = _recorded_plan(target.exp, previous)
    if old is None:
        what = f"plan_sha256 {str(previous.get('plan_sha256'))[:12]} vs {target.plan_sha[:12]}"
    else:
        differing = _differing_keys(old, target.resolved)
        if not differing:
            return
        what = f"{old.get('name')!r} vs {target.resolved.get('name')!r}; they differ in " + ", ".join(differing[:5])
        what += f" and {len(differing) - 5} more" if len(differing) > 5 else ""
    raise UsageError(
        f"experiment_id {target.exp.id!r} already holds another plan ({what}): choose another "
        "experiment_id, leave it out to derive one, or pass --rerun to replace that experiment"
    )


def _recorded_plan(exp: Experiment, record: dict) -> dict | None:
    """The plan the record's attempt ran (defaults of today's plan filled in), or None when
    config/plan.json is missing, unreadable or not the one the host wrote (the training can rewrite
    config/, the record it cannot)."""
    try:
        raw = safefs.read_bytes(exp.root, "config/plan.json")
        doc = json.loads(raw)
    except (OSError, ValueError, safefs.Tampered):
        return None
    if not isinstance(doc, dict) or plan_sha256(doc) != record.get("plan_sha256"):
        return None
    from pydantic import ValidationError

    from runner.plan.models import Plan

    try:  # with today's defaults filled in: a key added since it ran (at its default) is no difference
        return Plan.model_validate(doc).model_dump(mode="json")
    except ValidationError:
        return doc


def _differing_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plans, ignoring `ID_EXCLUDED_KEYS` at the top."""
    keys = sorted(set(old) | set(new))
    out: list[str] = []
    for key in keys:
        if not prefix and key in ID_EXCLUDED_KEYS:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def dry_run(loaded: LoadedPlan, workdir: Path, opts: RunOptions) -> dict:
    """What `run` would do, built from the same functions, without building, writing or starting anything.

    The document holds what the backend would start (for docker the container spec: user, mounts,
    capabilities, security options, limits, labels, environment, command): the trust boundary in
    one place.
    """
    backend = opts.backend
    gpus = plan_gpus(loaded, opts.gpus)
    images = backend.dry_prepare(workdir)
    target = Target.of(loaded, workdir, images.pop("image_hash", None), gpus)
    exp = target.exp
    previous = exp.read() if target.resolved.get("experiment_id") and exp.exists() else {}
    if previous and not opts.rerun:
        refuse_other_plan(target, previous)
    job = target.job(previous.get("attempt", 0) + 1, dry=True)
    job = job.with_image(images.get("image"), images.get("image_id") or ("<built on run>" if images else None))
    return {
        "backend": backend.name,
        "workdir": str(workdir),
        **images,
        "experiment_id": target.resolved.get("experiment_id"),
        "exp_dir": str(exp.root),
        "plan": target.resolved,
        **backend.describe(job),
    }


def open_attempt(target: Target, backend_name: str, previous: dict | None, rerun: bool, on_event=None) -> dict:
    """A new attempt of the experiment on disk: layout, the canonical plan, a fresh record (`created`)."""
    exp = target.exp
    attempt = (previous or {}).get("attempt", 0) + 1
    try:
        if previous and rerun:
            _archive_outputs(exp, previous.get("attempt", 0))
        exp.make_layout()
        safefs.write_atomic(exp.root, "config/plan.json", (canonical_json(target.resolved) + "\n").encode())
    except safefs.Tampered as exc:
        if previous:  # the record says why this attempt could not even start
            exp.update(state="failed", finished_at=now_iso(), message=exc.message)
        raise
    record = new_record(
        exp,
        name=target.resolved["name"],
        backend=backend_name,
        plan_sha=target.plan_sha,
        attempt=attempt,
        previous=previous,
    )
    record.update(runner_pid=os.getpid(), gpus=target.gpus.text(), db=str(target.db))
    if target.resolved.get("tracking"):  # logged to MLflow: hashed here, by the host, once per attempt
        from runner.run.tracking import db_sha256

        record["db_sha256"] = db_sha256(target.db)
    if target.weights:  # what `infra predict` checks the store's model against, and a rerun under this id
        record["model_sha256"] = target.weights
    exp.write(record)
    exp.event("state", state="created", attempt=attempt, resumed=bool(previous))
    if on_event is not None:
        on_event({"event": "state", "experiment_id": exp.id, "state": "created", "attempt": attempt})
    return record


def fail_attempt(exp: Experiment, exc: BaseException) -> None:
    """The record of an attempt that could not start: cancelled on Ctrl-C, else failed with the reason."""
    state = "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed"
    exp.update(state=state, finished_at=now_iso(), message=str(exc) or type(exc).__name__)


def _set_state(exp: Experiment, opts: RunOptions) -> Callable[..., dict]:
    def set_state(state: str, **fields) -> dict:
        record = exp.update(state=state, **fields)
        opts.on_event({"event": "state", "experiment_id": exp.id, "state": state, "attempt": record.get("attempt")})
        return record

    return set_state


class BuildLog:
    """The image build output of one run: passed on line by line, kept (capped) for `build.log`.

    The base image may be built before the experiment directory exists (its id depends on the
    image), so the lines are held in memory until `save`: the first half of the cap and the last
    half, with a line saying how much was dropped between them.
    """

    def __init__(self, on_line: Callable[[str], None], limit: int | None = None):
        self.on_line = on_line
        self.limit = BUILD_LOG_LIMIT if limit is None else limit
        self.head: list[str] = []
        self.tail: deque[str] = deque()
        self.head_bytes = self.tail_bytes = self.dropped = 0

    def add(self, line: str) -> None:
        self.on_line(line)
        size = len(line.encode()) + 1
        if self.head_bytes + size <= self.limit // 2 and not self.tail:
            self.head.append(line)
            self.head_bytes += size
            return
        self.tail.append(line)
        self.tail_bytes += size
        while self.tail_bytes > self.limit // 2:
            dropped = len(self.tail.popleft().encode()) + 1
            self.tail_bytes -= dropped
            self.dropped += dropped

    def text(self) -> str:
        gap = [f"[infra: {self.dropped} bytes of build output dropped here]"] if self.dropped else []
        return "".join(line + "\n" for line in (*self.head, *gap, *self.tail))

    def save(self, exp: Experiment) -> None:
        """Write `build.log` beside the host's records when this run built an image (else keep the old one)."""
        if not self.head:
            return
        try:
            safefs.write_atomic(exp.root, BUILD_LOG, self.text().encode())
        except (OSError, safefs.Tampered) as exc:  # the run itself is not spoilt by a missing copy of the log
            log.warning("could not write %s/%s: %s", exp.root, BUILD_LOG, getattr(exc, "message", exc))


def _archive_outputs(exp: Experiment, attempt: int) -> None:
    """--rerun: move the previous attempt's outputs to attempts/<n>/ so the new one starts fresh."""
    with (
        safefs.open_dir(exp.root, f"attempts/{attempt}", create=True) as target_fd,
        safefs.open_dir(exp.root) as root_fd,
    ):
        for name in MOUNTED_DIRS:
            try:
                os.replace(name, name, src_dir_fd=root_fd, dst_dir_fd=target_fd)
            except FileNotFoundError:
                continue


def follow(exp: Experiment, backend: Backend, opts: RunOptions, attached: bool = False) -> RunOutcome:
    """Stream the training's output until it ends; Ctrl-C stops it gracefully and records `cancelled`.

    With a tracking section, the run is logged to MLflow live while it goes (`runner.run.tracking_live`).
    """
    from runner.run import tracking_live

    record = exp.read()
    tracking_live.begin(exp, record)
    try:
        record = backend.follow(exp, record, opts.on_log)
    except KeyboardInterrupt:
        record = stop_experiment(exp, backend, timeout=opts.stop_timeout, reason="interrupted (Ctrl-C)")
        opts.on_event({"event": "state", "experiment_id": exp.id, "state": record["state"]})
        raise _with_record(
            Interrupted(f"experiment {exp.id} interrupted: stopped and marked {record['state']}"), record
        ) from None
    finally:
        tracking_live.end(exp)  # not finalised here (another reader did, or it failed): its client goes
    opts.on_event(
        {"event": "state", "experiment_id": exp.id, "state": record["state"], "exit_code": record.get("exit_code")}
    )
    return outcome_of(exp, record, attached)


def outcome_of(exp: Experiment, record: dict, attached: bool = False) -> RunOutcome:
    """The outcome of a final record: success, or the error saying why (with the log's tail)."""
    if record["state"] == "succeeded":
        return RunOutcome(exp.id, exp.root, record, EXIT_OK, attached=attached)
    if record["state"] == "cancelled":
        raise _with_record(Interrupted(f"experiment {exp.id} was cancelled; logs in {exp.container_log}"), record)
    from runner.run.logs import tail_text

    tail = tail_text(exp, 20)
    reason = core_error("train", tail)
    raise _with_record(
        ExperimentFailed(
            f"experiment {exp.id} {record['state']} (exit code {record.get('exit_code')}): "
            f"{reason or record.get('message') or 'see the log'}; log: {exp.container_log}",
            exit_status=record.get("exit_code"),
            log_tail=tail,
            reason=reason,
        ),
        record,
    )


def _with_record(exc: Exception, record: dict) -> Exception:
    """Attach the experiment's record so `--json` callers still learn its id and state."""
    exc.record = record
    return exc


def stop_experiment(
    exp: Experiment, backend: Backend | None = None, timeout: int = 60, reason: str = "stopped"
) -> dict:
    """Stop an active experiment gracefully (SIGTERM; SIGKILL after `timeout` s) and record `cancelled`."""
    from runner.run.reconcile import reconcile

    if timeout < 0:
        raise UsageError(f"--timeout {timeout}: must be 0 or more seconds")
    record = exp.read()
    if backend is None or backend.name != record["backend"]:
        backend = backend_of(record)
    record = reconcile(exp, backend)
    if record["state"] not in ACTIVE:
        return record
    record = exp.update(stop_requested=True, message=reason)
    return backend.stop(exp, record, timeout, reason)
