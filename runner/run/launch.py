"""The run path shared by `infra run`, the queue worker and the demo: plan → image → experiment → training.

    validate (done by the caller) → base + plugin image (docker) → experiment id → lock →
    idempotency decision → layout + record → pre-flight → container or local process →
    follow logs (foreground) or return (detach) → final state.

Both backends start the training detached from this process (a container, or a local process in its
own session writing `logs/container.log`), so a runner killed with SIGKILL leaves a run that
`infra status` can still reconcile. Ctrl-C stops the training gracefully and records `cancelled`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from runner import __version__
from runner.errors import EXIT_OK, EnvironmentProblem, ExperimentFailed, Interrupted, UsageError
from runner.plan.load import LoadedPlan
from runner.plan.models import GPU_LIST_PATTERN
from runner.run.reconcile import (
    EXIT_FILE,
    LABEL_ATTEMPT,
    LABEL_EXPERIMENT,
    LABEL_PLAN,
    LABEL_VERSION,
    EngineHandle,
    finalize,
    follow_file,
    reconcile,
)
from runner.run.records import (
    ACTIVE,
    Experiment,
    atomic_write_json,
    derive_experiment_id,
    experiments_root,
    new_record,
    now_iso,
    plan_sha256,
)

log = logging.getLogger(__name__)

CONTAINER_EXP = "/exp"
CONTAINER_DATA = "/data"
MIN_FREE_BYTES = int(os.environ.get("INFRA_MIN_FREE_BYTES", str(1 << 30)))
LOCK_TIMEOUT_S = 600
OUTPUT_DIRS = ("metrics", "ckpts", "artifacts", "splits", "embeddings", "data", "logs")


@dataclass
class RunOptions:
    backend: str = "docker"
    gpus: str | int | None = None  # --gpus; None keeps resources.gpus
    detach: bool = False
    rerun: bool = False
    stop_timeout: int = 60
    on_log: Callable[[str], None] = field(default=lambda line: None)  # training/build output lines
    on_event: Callable[[dict], None] = field(default=lambda event: None)  # state changes for --events


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


def invoking_user() -> tuple[int, int]:
    """uid:gid the training runs as: the sudo caller when run through sudo, else the current user."""
    if os.geteuid() == 0 and os.environ.get("SUDO_UID"):
        return int(os.environ["SUDO_UID"]), int(os.environ.get("SUDO_GID", os.environ["SUDO_UID"]))
    return os.getuid(), os.getgid()


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


def _gpus_requested(gpus) -> bool:
    return gpus not in (None, 0, "none", "0")


# --- images ---------------------------------------------------------------------------------------


@dataclass
class ImageDecision:
    base_tag: str
    spec: object  # runner.images.builds.BuildSpec of the plugin image
    image_id: str | None  # None: must be built


def decide_image(client, workdir: Path, on_log: Callable[[str], None]) -> ImageDecision:
    """Ensure the base image (INFRA_BASE_IMAGE, or built from this checkout) and plan the plugin image."""
    from runner import engine
    from runner.images import builds

    base_tag = os.environ.get("INFRA_BASE_IMAGE")
    if base_tag:
        base_id = engine.get_image_id(client, base_tag)
        if base_id is None:
            raise EnvironmentProblem(f"INFRA_BASE_IMAGE={base_tag} is not in the Docker engine; build or load it first")
    else:
        ref = builds.ensure_base_image(
            client,
            base_image=os.environ.get("INFRA_BASE_OS") or None,
            torch_spec=os.environ.get("INFRA_TORCH_SPEC") or None,
            on_log=on_log,
        )
        base_tag, base_id = ref.tag, ref.id
    spec = builds.plan_plugin_build(workdir, base_tag, base_id, builds.default_wheelhouse(builds.source_root()))
    return ImageDecision(base_tag, spec, engine.get_image_id(client, spec.tag))


def local_image_hash(workdir: Path) -> str:
    """The local backend's stand-in for an image hash: the plugin files and the core's version."""
    from runner.images import builds

    return builds.context_hash(builds.plugin_context_entries(workdir), {"backend": "local", "version": __version__})


# --- pre-flight -----------------------------------------------------------------------------------


def preflight_paths(db: Path, workdir: Path) -> None:
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
    if free < MIN_FREE_BYTES:
        raise EnvironmentProblem(
            f"only {free / 2**30:.2f} GiB free under {root}; free space (need {MIN_FREE_BYTES / 2**30:.2f} GiB, INFRA_MIN_FREE_BYTES)"
        )


def preflight_engine(client, gpus) -> None:
    from runner import engine

    if _gpus_requested(gpus) and not engine.gpu_runtime_available(client):
        raise EnvironmentProblem(
            f"GPUs requested (--gpus {gpus}) but the Docker engine has no GPU runtime: {engine.NVIDIA_HINT}"
        )


# --- the run --------------------------------------------------------------------------------------


def run(loaded: LoadedPlan, workdir: Path, opts: RunOptions) -> RunOutcome:
    """Run (or report, attach to, resume) the experiment of a validated plan. See the module docstring."""
    if opts.backend not in ("docker", "local"):
        raise UsageError(f"--backend {opts.backend!r}: use 'docker' or 'local'")
    resolved = loaded.resolved
    gpus = resolve_gpus(resolved["resources"]["gpus"], opts.gpus)
    resolved["resources"]["gpus"] = gpus
    db = Path(resolved["data"]["db"])
    preflight_paths(db, workdir)

    handle = EngineHandle()
    decision = None
    if opts.backend == "docker":
        client = handle.get()
        if client is None:
            raise handle.error
        preflight_engine(client, gpus)
        decision = decide_image(client, workdir, opts.on_log)
        image_hash = decision.spec.content_hash
    else:
        missing = [m for m in ("torch", "lightning", "pandas") if importlib.util.find_spec(m) is None]
        if missing:
            raise EnvironmentProblem(
                f"--backend local runs the training core in this Python, which lacks {', '.join(missing)}: "
                "install it with \"pip install 'infra[core]'\" (or use the docker backend)"
            )
        if _gpus_requested(gpus):
            log.info("local backend: GPUs are used when torch sees them; --gpus only sets CUDA_VISIBLE_DEVICES")
        image_hash = local_image_hash(workdir)

    exp_id = derive_experiment_id(resolved, image_hash)
    resolved["experiment_id"] = exp_id
    exp = Experiment(experiments_root(workdir) / exp_id)
    exp.lock_path.parent.mkdir(parents=True, exist_ok=True)

    with FileLock(str(exp.lock_path), timeout=LOCK_TIMEOUT_S):
        previous = reconcile(exp, handle) if exp.exists() else None
        if previous and previous["state"] == "succeeded" and not opts.rerun:
            opts.on_event({"event": "reused", "experiment_id": exp_id, "state": "succeeded"})
            return RunOutcome(exp_id, exp.root, previous, EXIT_OK, reused=True)
        if previous and previous["state"] in ACTIVE:
            attach = True
        else:
            attach = False
            record = _start_attempt(exp, resolved, previous, opts, decision, handle, gpus, db, workdir)
    if attach:
        opts.on_event({"event": "attached", "experiment_id": exp_id, "state": previous["state"]})
        if opts.detach:
            return RunOutcome(exp_id, exp.root, previous, EXIT_OK, attached=True)
        return follow(exp, opts, handle, attached=True)
    if opts.detach:
        return RunOutcome(exp_id, exp.root, record, EXIT_OK)
    return follow(exp, opts, handle)


def _start_attempt(exp, resolved, previous, opts, decision, handle, gpus, db, workdir) -> dict:
    attempt = (previous or {}).get("attempt", 0) + 1
    if previous and opts.rerun:
        _archive_outputs(exp, previous.get("attempt", 0))
    exp.make_layout()
    plan_path = exp.root / "config" / "plan.json"
    atomic_write_json(plan_path, resolved)
    record = new_record(
        exp,
        name=resolved["name"],
        backend=opts.backend,
        plan_sha=plan_sha256(resolved),
        attempt=attempt,
        previous=previous,
    )
    record["runner_pid"] = os.getpid()
    record["gpus"] = gpus
    exp.write(record)
    exp.event("state", state="created", attempt=attempt, resumed=bool(previous))
    opts.on_event({"event": "state", "experiment_id": exp.id, "state": "created", "attempt": attempt})
    try:
        if opts.backend == "docker":
            return _start_container(exp, resolved, decision, handle.get(), gpus, db, workdir, opts)
        return _start_local(exp, db, workdir, gpus, opts)
    except BaseException as exc:
        state = "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed"
        exp.update(state=state, finished_at=now_iso(), message=str(exc) or type(exc).__name__)
        raise


def _archive_outputs(exp: Experiment, attempt: int) -> None:
    """--rerun: move the previous attempt's outputs to attempts/<n>/ so the new one starts fresh."""
    target = exp.root / "attempts" / str(attempt)
    target.mkdir(parents=True, exist_ok=True)
    for name in (*OUTPUT_DIRS, "config"):
        src = exp.root / name
        if src.exists():
            os.replace(src, target / name)


def _set_state(exp: Experiment, opts: RunOptions, state: str, **fields) -> dict:
    record = exp.update(state=state, **fields)
    opts.on_event({"event": "state", "experiment_id": exp.id, "state": state, "attempt": record.get("attempt")})
    return record


def _start_container(exp, resolved, decision, client, gpus, db, workdir, opts) -> dict:
    from runner import engine
    from runner.images import builds

    image_id = decision.image_id
    if image_id is None:
        _set_state(exp, opts, "building", image=decision.spec.tag)
        image_id = builds.build(client, decision.spec, opts.on_log).id
    record = _set_state(exp, opts, "starting", image=decision.spec.tag, image_id=image_id)
    # A container of an earlier attempt (kept after a runner crash) would hold the name.
    for old in engine.find_containers(client, {LABEL_EXPERIMENT: exp.id}):
        engine.remove_container(old)
    uid, gid = invoking_user()
    res = resolved["resources"]
    db_dir = db.parent
    container = engine.run_container(
        client,
        decision.spec.tag,
        [
            "infra-train",
            f"{CONTAINER_EXP}/config/plan.json",
            "--exp-dir",
            CONTAINER_EXP,
            "--db",
            f"{CONTAINER_DATA}/{db.name}",
            "--workdir",
            "/workdir",
        ],
        name=f"infra-{exp.id}",
        labels={
            LABEL_EXPERIMENT: exp.id,
            LABEL_ATTEMPT: str(record["attempt"]),
            LABEL_PLAN: record["plan_sha256"],
            LABEL_VERSION: __version__,
        },
        mounts=[(str(db_dir), CONTAINER_DATA, "ro"), (str(exp.root), CONTAINER_EXP, "rw")],
        user=f"{uid}:{gid}",
        environment={
            "HOME": "/tmp/home",
            "INFRA_IMAGE_ID": image_id,
            "INFRA_EXPERIMENT_ID": exp.id,
            "PYTHONUNBUFFERED": "1",
        },
        shm_size=res.get("shm_size"),
        mem_limit=res.get("memory"),
        nano_cpus=int(res["cpus"] * 1e9) if res.get("cpus") else None,
        network_mode=res.get("network", "none"),
        gpus=gpus if _gpus_requested(gpus) else None,
    )
    return _set_state(exp, opts, "running", container_id=container.id, started_at=now_iso())


def _start_local(exp, db, workdir, gpus, opts) -> dict:
    _set_state(exp, opts, "starting", image=None, image_id=None)
    (exp.root / EXIT_FILE).unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", INFRA_EXPERIMENT_ID=exp.id, MPLBACKEND="Agg")
    if _gpus_requested(gpus) and isinstance(gpus, str) and gpus != "all":
        env["CUDA_VISIBLE_DEVICES"] = gpus
    elif not _gpus_requested(gpus):
        env["CUDA_VISIBLE_DEVICES"] = ""
    core = [
        sys.executable,
        "-m",
        "runner.core",
        str(exp.root / "config" / "plan.json"),
        "--exp-dir",
        str(exp.root),
        "--db",
        str(db),
        "--workdir",
        str(workdir),
    ]
    wrapper = [sys.executable, "-m", "runner.run.local_wrapper", str(exp.root / EXIT_FILE), *core]
    with open(exp.container_log, "ab") as logf:
        proc = subprocess.Popen(
            wrapper,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            cwd=str(exp.root),
        )
    return _set_state(exp, opts, "running", pid=proc.pid, started_at=now_iso())


# --- following ------------------------------------------------------------------------------------


def follow(exp: Experiment, opts: RunOptions, handle: EngineHandle, attached: bool = False) -> RunOutcome:
    """Stream the training's output until it ends; Ctrl-C stops it gracefully and records `cancelled`."""
    record = exp.read()
    try:
        if record["backend"] == "docker":
            record = _follow_container(exp, record, opts, handle)
        else:
            record = _follow_local(exp, record, opts)
    except KeyboardInterrupt:
        record = stop_experiment(exp, handle, timeout=opts.stop_timeout, reason="interrupted (Ctrl-C)")
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
    raise _with_record(
        ExperimentFailed(
            f"experiment {exp.id} {record['state']} (exit code {record.get('exit_code')}); log: {exp.container_log}",
            exit_status=record.get("exit_code"),
            log_tail=_tail(exp.container_log, 20),
        ),
        record,
    )


def _with_record(exc: Exception, record: dict) -> Exception:
    """Attach the experiment's record so `--json` callers still learn its id and state."""
    exc.record = record
    return exc


def _follow_container(exp, record, opts, handle) -> dict:
    from runner import engine
    from runner.run.reconcile import container_for

    client = handle.get()
    container = container_for(client, record)
    if container is None:
        return reconcile(exp, handle)
    with open(exp.container_log, "w", encoding="utf-8") as logf:

        def on_line(line: str) -> None:
            logf.write(line + "\n")
            logf.flush()
            opts.on_log(line)

        engine.stream_logs(container, on_line, follow=True)
    code = engine.wait(container)
    record = exp.update(log_complete=True)
    return finalize(exp, record, code, container)


def _follow_local(exp, record, opts) -> dict:
    pid = int(record["pid"])
    exit_file = exp.root / EXIT_FILE

    def reap() -> None:  # our own child must not linger as a zombie
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass

    follow_file(exp.container_log, exit_file, opts.on_log, on_idle=reap)
    record = exp.update(log_complete=True)
    return finalize(exp, record, int(exit_file.read_text().strip()))


def stop_experiment(
    exp: Experiment, handle: EngineHandle | None = None, timeout: int = 60, reason: str = "stopped"
) -> dict:
    """Stop an active experiment gracefully (SIGTERM; SIGKILL after `timeout` s) and record `cancelled`."""
    handle = handle or EngineHandle()
    record = reconcile(exp, handle)
    if record["state"] not in ACTIVE:
        return record
    record = exp.update(stop_requested=True, message=reason)
    if record["backend"] == "docker":
        from runner import engine
        from runner.run.reconcile import container_for

        client = handle.get()
        if client is None:
            raise handle.error
        container = container_for(client, record)
        if container is None:
            return reconcile(exp, handle)
        _stop_with_second_interrupt(lambda: engine.stop(container, timeout=timeout))
        return finalize(exp, exp.read(), engine.wait(container), container, message=reason)
    pid = int(record["pid"])
    try:
        os.kill(pid, signal.SIGTERM)  # the wrapper forwards it to the core
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    exit_file = exp.root / EXIT_FILE
    while not exit_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not exit_file.exists():
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        time.sleep(0.3)
    code = int(exit_file.read_text().strip()) if exit_file.exists() else 137
    return finalize(exp, exp.read(), code, message=reason)


def _stop_with_second_interrupt(stop: Callable[[], None]) -> None:
    """Run a graceful stop; a second Ctrl-C during it is swallowed so the stop (and the record) completes."""
    done = threading.Event()

    def target():
        try:
            stop()
        finally:
            done.set()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while not done.is_set():
        try:
            done.wait(0.2)
        except KeyboardInterrupt:
            log.warning("stopping: waiting for the training to checkpoint (it is killed after the stop timeout)")


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
