"""Where a training runs: one small interface, two implementations (a container, or a host process).

    backend.prepare(workdir, gpus, on_log)  → image decision / pre-flight (before the experiment id)
    backend.start(exp, plan, record, ...)   → the training started detached from this process
    backend.follow(exp, record, on_log)     → stream its output until it ends; the final record
    backend.stop(exp, record, timeout)      → graceful stop (SIGTERM, then kill after `timeout`)
    backend.reconcile(exp, record)          → the record made true against the engine / the process

The run path (`runner.run.launch`) and the readers (`runner.run.reconcile`) only ever talk to this
interface; `backend_for(name)` is the one place a backend name is looked at.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runner import __version__, safefs
from runner.errors import EnvironmentProblem, UsageError
from runner.run.hardening import unprivileged_user
from runner.run.records import MOUNTED_DIRS, Experiment, now_iso
from runner.run.spec import (
    LABEL_ATTEMPT,
    LABEL_EXPERIMENT,
    LABEL_WORKDIR,
    container_spec,
    workdir_identity,
)
from runner.settings import NodeSettings

log = logging.getLogger(__name__)

EXIT_FILE = ".exit_code"  # written by the local backend's wrapper when the core process ends
BACKENDS = ("docker", "local")


def gpus_requested(gpus) -> bool:
    return gpus not in (None, 0, "none", "0")


@dataclass(frozen=True)
class Prepared:
    """What `prepare` found: the content hash the experiment id uses, and the image (docker)."""

    image_hash: str
    image_tag: str | None = None
    image_id: str | None = None  # None with a tag: the image must be built first
    build: object | None = None  # the plugin BuildSpec when it must be built


class EngineHandle:
    """A Docker client made on first use, so reading local-backend records never needs Docker."""

    def __init__(self, client=None):
        self._client = client
        self.error: EnvironmentProblem | None = None

    def get(self):
        if self._client is None and self.error is None:
            from runner import engine

            try:
                self._client = engine.get_client()
            except EnvironmentProblem as exc:
                self.error = exc
        return self._client

    def require(self):
        client = self.get()
        if client is None:
            raise self.error
        return client


class DockerBackend:
    name = "docker"

    def __init__(self, settings: NodeSettings, handle: EngineHandle | None = None):
        self.settings = settings
        self.handle = handle or EngineHandle()

    # --- before the experiment exists -------------------------------------------------------------

    def prepare(self, workdir: Path, gpus, on_log: Callable[[str], None]) -> Prepared:
        from runner import engine
        from runner.images.decide import decide_image

        client = self.handle.require()
        self.on_build_log = on_log  # a build in `start` reports the same way
        if gpus_requested(gpus) and not engine.gpu_runtime_available(client):
            raise EnvironmentProblem(
                f"GPUs requested (--gpus {gpus}) but the Docker engine has no GPU runtime: {engine.NVIDIA_HINT}"
            )
        decision = decide_image(client, workdir, on_log)
        return Prepared(decision.spec.content_hash, decision.spec.tag, decision.image_id, decision.spec)

    # --- one attempt ------------------------------------------------------------------------------

    def spec(self, exp: Experiment, record: dict, resolved: dict, db: Path, workdir: Path, image_id: str):
        return container_spec(
            experiment_id=exp.id,
            exp_root=exp.root,
            attempt=record["attempt"],
            plan_sha=record["plan_sha256"],
            db=db,
            resources=resolved["resources"],
            gpus=record.get("gpus"),
            image=record["image"],
            image_id=image_id,
            workdir=workdir,
            settings=self.settings,
            mounted_dirs=MOUNTED_DIRS,
            user=unprivileged_user(settings=self.settings),
        )

    def start(self, exp, resolved, record, prepared: Prepared, db: Path, workdir: Path, set_state) -> dict:
        from runner import engine
        from runner.images import builds

        client = self.handle.require()
        image_id = prepared.image_id
        if image_id is None:
            set_state("building", image=prepared.image_tag)
            image_id = builds.build(client, prepared.build, self.on_build_log).id
        record = set_state("starting", image=prepared.image_tag, image_id=image_id)
        # A container of an earlier attempt of this experiment in this workdir (kept after a runner
        # crash) would hold the name; another workdir's containers are never touched.
        for old in engine.find_containers(client, self.labels(exp)):
            engine.remove_container(old)
        spec = self.spec(exp, record, resolved, db, workdir, image_id)
        _give_outputs_to(exp, spec.user)
        container = engine.run_container(client, spec.image, **spec.engine_kwargs())
        return set_state("running", container_id=container.id, started_at=now_iso())

    on_build_log: Callable[[str], None] = staticmethod(lambda line: None)

    def labels(self, exp: Experiment, attempt=None) -> dict[str, str]:
        labels = {LABEL_EXPERIMENT: exp.id, LABEL_WORKDIR: workdir_identity(exp.root.parent.parent)}
        if attempt is not None:
            labels[LABEL_ATTEMPT] = str(attempt)
        return labels

    def container(self, exp: Experiment, record: dict):
        from runner import engine

        client = self.handle.get()
        if client is None:
            return None
        found = engine.find_containers(client, self.labels(exp, record.get("attempt")))
        return found[0] if found else None

    def follow(self, exp: Experiment, record: dict, on_log: Callable[[str], None]) -> dict:
        from runner import engine
        from runner.run.logs import capture_container

        self.handle.require()
        container = self.container(exp, record)
        if container is None:
            return self.reconcile(exp, record)
        try:
            capture_container(exp, container, on_log)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            # The training fails on the same full disk; wait for it so the record ends truthfully,
            # and give back the log's last MiB so the final record itself can be written.
            code = engine.wait(container)
            _shorten_log(exp, 1 << 20)
            self.finish(exp, exp.update(log_complete=True), code, container, message=f"disk full: {exc}")
            raise EnvironmentProblem(
                f"the disk under {exp.root} is full ({exc.strerror}); the experiment was recorded failed: "
                "free space and run it again (it resumes from its last checkpoint)"
            ) from None
        code = engine.wait(container)
        record = exp.update(log_complete=True)
        return self.finish(exp, record, code, container)

    def stop(self, exp: Experiment, record: dict, timeout: int, reason: str) -> dict:
        from runner import engine

        self.handle.require()
        container = self.container(exp, record)
        if container is None:
            return self.reconcile(exp, record)
        _stop_with_second_interrupt(lambda: engine.stop(container, timeout=timeout))
        return self.finish(exp, exp.read(), engine.wait(container), container, message=reason)

    def reconcile(self, exp: Experiment, record: dict) -> dict:
        from runner import engine
        from runner.run.reconcile import pid_alive

        if record.get("state") != "running" and not record.get("container_id"):
            # building/starting in a live runner: trust it while that runner is alive
            if pid_alive(record.get("runner_pid")):
                return record
            return exp.update(
                state="lost", finished_at=now_iso(), message="the runner stopped before the container started"
            )
        if self.handle.get() is None:
            return {**record, "verified": False, "message": f"state not verified: {self.handle.error}"}
        container = self.container(exp, record)
        if container is None:
            # Another reader may have finalised and removed it since `record` was read: believe the
            # record on disk over the stale copy.
            current = exp.read()
            if current.get("state") not in ("building", "starting", "running") or current.get("attempt") != record.get(
                "attempt"
            ):
                return current
            return exp.update(
                state="lost",
                finished_at=now_iso(),
                message="the container is gone from the engine (removed or the engine was reset)",
            )
        state = engine.container_state(container)
        if state["status"] == "removed":  # finalised by another reader just now
            record = exp.read()
            if record.get("state") in ("building", "starting", "running"):
                return exp.update(
                    state="lost", finished_at=now_iso(), message="the container was removed while running"
                )
            return record
        if state["status"] in ("created", "running", "restarting", "paused"):
            return record if record.get("state") == "running" else exp.update(state="running")
        message = "the training was killed: out of memory (resources.memory)" if state.get("oom_killed") else None
        return self.finish(exp, record, state["exit_code"], container, message=message)

    def finish(self, exp, record, exit_code, container, message=None) -> dict:
        """Save the log (when not captured live), record the final state, then remove the container.

        Serialised per experiment: the foreground runner and any number of `infra status` readers may
        see the same exited container; the first one finalises, the others find the final record.
        """
        from filelock import FileLock

        from runner import engine
        from runner.run.logs import save_container_log
        from runner.run.reconcile import finalize

        with FileLock(str(exp.lock_path.with_name(f"{exp.id}.final.lock")), timeout=600):
            current = exp.read()
            if current.get("state") not in ("building", "starting", "running") or current.get("attempt") != record.get(
                "attempt"
            ):
                engine.remove_container(container)
                return current
            if not current.get("log_complete"):
                try:
                    save_container_log(exp, container)
                except (OSError, safefs.Tampered, EnvironmentProblem) as exc:
                    log.warning("could not save the log of %s: %s", exp.id, exc)
            record = finalize(exp, current, exit_code, message=message)
            engine.remove_container(container)
        _clear_setid_bits(exp)
        _track(exp, record)  # only the one caller that made the record final gets here
        return record


class LocalBackend:
    """The training core as a host process (`--backend local`): trusted code, the invoker's rights."""

    name = "local"

    def __init__(self, settings: NodeSettings):
        self.settings = settings

    def prepare(self, workdir: Path, gpus, on_log) -> Prepared:
        missing = [m for m in ("torch", "lightning", "pandas") if importlib.util.find_spec(m) is None]
        if missing:
            raise EnvironmentProblem(
                f"--backend local runs the training core in this Python, which lacks {', '.join(missing)}: "
                "install it with \"pip install 'infra[core]'\" (or use the docker backend)"
            )
        if gpus_requested(gpus):
            log.info("local backend: GPUs are used when torch sees them; --gpus only sets CUDA_VISIBLE_DEVICES")
        return Prepared(local_image_hash(workdir))

    def start(self, exp, resolved, record, prepared, db, workdir, set_state) -> dict:
        set_state("starting", image=None, image_id=None)
        with safefs.open_dir(exp.root) as dfd:
            try:
                os.unlink(EXIT_FILE, dir_fd=dfd)
            except FileNotFoundError:
                pass
        gpus = record.get("gpus")
        env = dict(os.environ, PYTHONUNBUFFERED="1", INFRA_EXPERIMENT_ID=exp.id, MPLBACKEND="Agg")
        if gpus_requested(gpus) and isinstance(gpus, str) and gpus != "all":
            env["CUDA_VISIBLE_DEVICES"] = gpus
        elif not gpus_requested(gpus):
            env["CUDA_VISIBLE_DEVICES"] = ""
        core = [sys.executable, "-m", "runner.core", str(exp.root / "config" / "plan.json"), "--exp-dir", str(exp.root),
                "--workdir", str(workdir)]  # fmt: skip
        # The wrapper captures the output into the kept log (capped, bounded) and writes the exit file
        # only once the log is complete.
        wrapper = [sys.executable, "-m", "runner.run.local_wrapper", "--log-dir", str(exp.root),
                   str(exp.root / EXIT_FILE), *core]  # fmt: skip
        proc = subprocess.Popen(
            wrapper,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            cwd=str(exp.root),
        )
        return set_state("running", pid=proc.pid, started_at=now_iso())

    def exit_code(self, exp: Experiment) -> int | None:
        try:
            return int(safefs.read_bytes(exp.root, EXIT_FILE, limit=64).decode().strip())
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return None

    def follow(self, exp: Experiment, record: dict, on_log) -> dict:
        from runner.run.logs import follow_local

        pid = int(record["pid"])

        def reap() -> None:  # our own child must not linger as a zombie
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass

        follow_local(exp, on_log, on_idle=reap)
        record = exp.update(log_complete=True)
        return self.finish(exp, record, self.exit_code(exp))

    def stop(self, exp: Experiment, record: dict, timeout: int, reason: str) -> dict:
        pid = int(record["pid"])
        try:
            os.kill(pid, signal.SIGTERM)  # the wrapper forwards it to the core
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while self.exit_code(exp) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.exit_code(exp) is None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            time.sleep(0.3)
        code = self.exit_code(exp)
        return self.finish(exp, exp.read(), 137 if code is None else code, message=reason)

    def reconcile(self, exp: Experiment, record: dict) -> dict:
        from runner.run.reconcile import is_our_process, pid_alive

        pid = record.get("pid")
        if pid_alive(pid) and is_our_process(pid, exp.id):
            return record
        code = self.exit_code(exp)
        if code is None:
            return exp.update(
                state="lost", finished_at=now_iso(), message="the training process is gone and left no exit code"
            )
        return self.finish(exp, record, code)

    def finish(self, exp: Experiment, record: dict, exit_code: int | None, message: str | None = None) -> dict:
        """Record the final state once: the runner and any number of readers may see the same exit."""
        from filelock import FileLock

        from runner.run.reconcile import finalize

        with FileLock(str(exp.lock_path.with_name(f"{exp.id}.final.lock")), timeout=600):
            current = exp.read()
            if current.get("state") not in ("building", "starting", "running") or current.get("attempt") != record.get(
                "attempt"
            ):
                return current
            record = finalize(exp, current, exit_code, message=message)
        _track(exp, record)
        return record


def _track(exp: Experiment, record: dict) -> None:
    """Log the attempt that just ended to the plan's MLflow server (a no-op without `tracking`)."""
    from runner.run.tracking import track_finished

    track_finished(exp, record)


def local_image_hash(workdir: Path) -> str:
    """The local backend's stand-in for an image hash: the plugin files and the core's version."""
    from runner.images import builds

    return builds.context_hash(builds.plugin_context_entries(workdir), {"backend": "local", "version": __version__})


def backend_for(name: str, settings: NodeSettings, handle: EngineHandle | None = None):
    """The backend called `name` ("docker" or "local"); a UsageError names the choices."""
    if name == "docker":
        return DockerBackend(settings, handle)
    if name == "local":
        return LocalBackend(settings)
    raise UsageError(f"--backend {name!r}: use 'docker' or 'local'")


def _give_outputs_to(exp: Experiment, user: str) -> None:
    """When infra runs as root and the training as another uid, the output folders must be theirs."""
    if os.geteuid() != 0:
        return
    uid, gid = (int(x) for x in user.split(":"))
    with safefs.open_dir(exp.root) as root_fd:
        for sub in MOUNTED_DIRS:
            os.chown(sub, uid, gid, dir_fd=root_fd, follow_symlinks=False)


def _shorten_log(exp: Experiment, nbytes: int) -> None:
    fd = safefs.open_append(exp.root, exp.container_log.name)
    try:
        os.ftruncate(fd, max(os.fstat(fd).st_size - nbytes, 0))
        os.write(fd, b"\n[infra: the disk is full; the log is cut here]\n")
    except OSError as exc:
        log.warning("could not shorten %s: %s", exp.container_log, exc)
    finally:
        os.close(fd)


def _clear_setid_bits(exp: Experiment) -> None:
    """No file the training left may carry setuid/setgid bits (a way up for a local user)."""
    for sub in MOUNTED_DIRS:
        try:
            cleared = safefs.clear_setid_bits(exp.root / sub) if not (exp.root / sub).is_symlink() else []
        except FileNotFoundError:
            continue
        for rel in cleared:
            log.warning("%s: removed setuid/setgid bits from %s/%s left by the training", exp.id, sub, rel)
            exp.event("tampered", path=f"{sub}/{rel}", action="setuid/setgid bits removed")


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
