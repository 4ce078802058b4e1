"""The run path shared by `infra run`, sweeps, the queue worker and the demo: plan → experiment → training.

    LoadedPlan (typed, validated by the caller) → backend.prepare (image / pre-flight) → experiment id
    → lock → idempotency decision → layout + record + config/plan.json → backend.start → follow
    (foreground) or return (detach) → final state.

The plan is serialised once, here, into the experiment's canonical `config/plan.json`, with the
database path already rewritten for where the training reads it (inside the container, or on the
host for the local backend); the training core reads that file and nothing else. Both backends start
the training detached from this process, so a runner killed with SIGKILL leaves a run that
`infra status` can still reconcile. Ctrl-C stops the training gracefully and records `cancelled`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from runner import safefs
from runner.errors import EXIT_OK, EnvironmentProblem, ExperimentFailed, Interrupted, UsageError
from runner.plan.load import LoadedPlan
from runner.plan.models import GPU_LIST_PATTERN
from runner.run.backends import Prepared, backend_for, local_image_hash  # noqa: F401 - the queue's id
from runner.run.records import (
    ACTIVE,
    Experiment,
    canonical_json,
    derive_experiment_id,
    experiments_root,
    new_record,
    now_iso,
    plan_sha256,
)
from runner.run.spec import container_db_path
from runner.settings import NodeSettings, node_settings

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 600
CORE_ERROR = "infra-train: error: "  # how the training core prints its one-line errors
BUILD_LOG = "build.log"  # the image build output of the experiment's last build, host-only
BUILD_LOG_LIMIT = 4 << 20
OUTPUT_DIRS = ("metrics", "ckpts", "artifacts", "splits", "embeddings", "data", "logs")


@dataclass
class RunOptions:
    backend: str = "docker"
    gpus: str | int | list | None = None  # --gpus; None keeps resources.gpus
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


def resolve_gpus(plan_gpus, override) -> str | int:
    """The GPU request: `--gpus` (validated like resources.gpus) over the plan's value; "2" → count 2."""
    if isinstance(override, list | tuple):  # exact device ids (a queue worker's GPU slot), never a count
        return ",".join(str(d) for d in override)
    if isinstance(override, str) and not re.fullmatch(GPU_LIST_PATTERN, override.strip()):
        raise UsageError(f"--gpus {override!r}: use all, none, a GPU count or a device list like 0,2")
    value = plan_gpus if override is None else override
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    return value


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


def run(loaded: LoadedPlan, workdir: Path, opts: RunOptions) -> RunOutcome:
    """Run (or report, attach to, resume) the experiment of a validated plan. See the module docstring."""
    settings = node_settings()
    if opts.stop_timeout < 0:
        raise UsageError(f"--stop-timeout {opts.stop_timeout}: must be 0 or more seconds")
    backend = backend_for(opts.backend, settings)
    plan = loaded.plan
    if plan.tracking is not None:  # checked where the run happens: a Master that only submits needs no client
        from runner.run.tracking import require_client

        require_client(loaded.source)
    gpus = resolve_gpus(plan.resources.gpus, opts.gpus)
    db = Path(plan.data.db)
    preflight_paths(db, workdir, settings)
    build_log = BuildLog(opts.on_log if opts.on_build_log is None else opts.on_build_log)
    prepared = backend.prepare(workdir, gpus, build_log.add)
    if prepared.image_tag is not None:
        opts.on_phase({"phase": "image", "tag": prepared.image_tag, "reused": prepared.image_id is not None})

    resolved = plan.model_dump(mode="json")
    exp_id = derive_experiment_id(resolved, prepared.image_hash)
    resolved["experiment_id"] = exp_id
    exp = Experiment(experiments_root(workdir) / exp_id)
    exp.lock_path.parent.mkdir(parents=True, exist_ok=True)

    with FileLock(str(exp.lock_path), timeout=LOCK_TIMEOUT_S):
        from runner.run.reconcile import reconcile

        previous = reconcile(exp, backend) if exp.exists() else None
        if previous and previous["state"] == "succeeded" and not opts.rerun:
            opts.on_event({"event": "reused", "experiment_id": exp_id, "state": "succeeded"})
            return RunOutcome(exp_id, exp.root, previous, EXIT_OK, reused=True)
        attach = bool(previous and previous["state"] in ACTIVE)
        if not attach:
            record = _start_attempt(exp, backend, resolved, previous, opts, prepared, gpus, db, workdir, build_log)
    if attach:
        opts.on_event({"event": "attached", "experiment_id": exp_id, "state": previous["state"]})
        if opts.detach:
            return RunOutcome(exp_id, exp.root, previous, EXIT_OK, attached=True)
        return follow(exp, backend, opts, attached=True)
    if opts.detach:
        return RunOutcome(exp_id, exp.root, record, EXIT_OK)
    return follow(exp, backend, opts)


def dry_run(loaded: LoadedPlan, workdir: Path, opts: RunOptions) -> dict:
    """What `run` would do, built from the same functions, without building, writing or starting anything.

    For the docker backend the document holds the container spec (user, mounts, capabilities,
    security options, limits, labels, environment, command): the trust boundary in one place.
    """
    settings = node_settings()
    backend = backend_for(opts.backend, settings)
    plan = loaded.plan
    gpus = resolve_gpus(plan.resources.gpus, opts.gpus)
    resolved = plan.model_dump(mode="json")
    db = Path(plan.data.db)
    doc: dict = {"backend": backend.name, "workdir": str(workdir)}
    if backend.name == "docker":
        from runner.images.decide import plan_images

        images = plan_images(backend.handle.require(), workdir)
        plugin = images["plugins"]
        image_hash, image, image_id = plugin.get("content_hash"), plugin.get("tag"), plugin.get("id")
        doc["base_image"] = images["base"]["tag"]
        doc["image"] = image
        doc["image_exists"] = bool(plugin.get("exists"))
        if image is None:
            doc["note"] = (
                f"base image {images['base']['tag']} is missing: 'infra run' builds it first (or 'infra build --base')"
            )
    else:
        image_hash = local_image_hash(workdir)
    exp_id = derive_experiment_id(resolved, image_hash) if image_hash else resolved.get("experiment_id")
    doc["experiment_id"] = exp_id
    exp = Experiment(experiments_root(workdir) / (exp_id or f"{plan.name}-<id after the build>"))
    doc["exp_dir"] = str(exp.root)
    if exp_id:
        resolved["experiment_id"] = exp_id
    doc["plan"] = plan_for_training(resolved, backend.name)
    if backend.name == "docker":
        previous = exp.read() if exp_id and exp.exists() else {}
        stub = {"attempt": previous.get("attempt", 0) + 1, "plan_sha256": plan_sha256(resolved), "gpus": gpus,
                "image": image or "<plugin image, built on run>"}  # fmt: skip
        spec = backend.spec(exp, stub, resolved, db, workdir, image_id or "<built on run>")
        doc["container"] = spec.describe()
    return doc


def plan_for_training(resolved: dict, backend_name: str) -> dict:
    """The canonical plan the training reads: the database path as the training sees it."""
    db = resolved["data"]["db"]
    inside = container_db_path(Path(db)) if backend_name == "docker" else db
    return {**resolved, "data": {**resolved["data"], "db": inside}}


def _start_attempt(exp, backend, resolved, previous, opts, prepared: Prepared, gpus, db, workdir, build_log) -> dict:
    attempt = (previous or {}).get("attempt", 0) + 1
    try:
        if previous and opts.rerun:
            _archive_outputs(exp, previous.get("attempt", 0))
        exp.make_layout()
        training_plan = plan_for_training(resolved, backend.name)
        safefs.write_atomic(exp.root, "config/plan.json", (canonical_json(training_plan) + "\n").encode())
    except safefs.Tampered as exc:
        if previous:  # the record says why this attempt could not even start
            exp.update(state="failed", finished_at=now_iso(), message=exc.message)
        raise
    record = new_record(
        exp,
        name=resolved["name"],
        backend=backend.name,
        plan_sha=plan_sha256(resolved),
        attempt=attempt,
        previous=previous,
    )
    record.update(runner_pid=os.getpid(), gpus=gpus, db=str(db))
    exp.write(record)
    exp.event("state", state="created", attempt=attempt, resumed=bool(previous))
    opts.on_event({"event": "state", "experiment_id": exp.id, "state": "created", "attempt": attempt})

    def set_state(state: str, **fields) -> dict:
        record = exp.update(state=state, **fields)
        opts.on_event({"event": "state", "experiment_id": exp.id, "state": state, "attempt": record.get("attempt")})
        return record

    try:
        return backend.start(exp, resolved, exp.read(), prepared, db, workdir, set_state)
    except BaseException as exc:
        state = "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed"
        exp.update(state=state, finished_at=now_iso(), message=str(exc) or type(exc).__name__)
        raise
    finally:
        build_log.save(exp)  # a failed build's whole log is what its user needs most


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
        for name in (*OUTPUT_DIRS, "config"):
            try:
                os.replace(name, name, src_dir_fd=root_fd, dst_dir_fd=target_fd)
            except FileNotFoundError:
                continue


def follow(exp: Experiment, backend, opts: RunOptions, attached: bool = False) -> RunOutcome:
    """Stream the training's output until it ends; Ctrl-C stops it gracefully and records `cancelled`."""
    record = exp.read()
    try:
        record = backend.follow(exp, record, opts.on_log)
    except KeyboardInterrupt:
        record = stop_experiment(exp, backend, timeout=opts.stop_timeout, reason="interrupted (Ctrl-C)")
        opts.on_event({"event": "state", "experiment_id": exp.id, "state": record["state"]})
        raise _with_record(
            Interrupted(f"experiment {exp.id} interrupted: stopped and marked {record['state']}"), record
        ) from None
    opts.on_event(
        {"event": "state", "experiment_id": exp.id, "state": record["state"], "exit_code": record.get("exit_code")}
    )
    if record["state"] == "succeeded":
        return RunOutcome(exp.id, exp.root, record, EXIT_OK, attached=attached)
    if record["state"] == "cancelled":
        raise _with_record(Interrupted(f"experiment {exp.id} was cancelled; logs in {exp.container_log}"), record)
    from runner.run.logs import tail_text

    tail = tail_text(exp, 20)
    reason = next(
        (line.split(CORE_ERROR, 1)[1].strip() for line in reversed(tail.splitlines()) if CORE_ERROR in line), None
    )
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


def stop_experiment(exp: Experiment, backend=None, timeout: int = 60, reason: str = "stopped") -> dict:
    """Stop an active experiment gracefully (SIGTERM; SIGKILL after `timeout` s) and record `cancelled`."""
    from runner.run.reconcile import reconcile

    if timeout < 0:
        raise UsageError(f"--timeout {timeout}: must be 0 or more seconds")
    record = exp.read()
    backend = backend if backend is not None and backend.name == record["backend"] else None
    backend = backend or backend_for(record["backend"], node_settings())
    record = reconcile(exp, backend)
    if record["state"] not in ACTIVE:
        return record
    record = exp.update(stop_requested=True, message=reason)
    return backend.stop(exp, record, timeout, reason)
