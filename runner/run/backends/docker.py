"""The docker backend: every core job in a hardened container of the workdir's plugin image.

A job becomes a `runner.run.spec.ContainerSpec` (`container_spec`), the one place that decides
the container's user, mounts, limits and labels; this module only starts, follows, stops and
reads containers through `runner.engine`, the one module that talks to the daemon.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path

from runner.errors import EnvironmentProblem
from runner.plan.models import GpuRequest
from runner.run.backends import CoreOutput, CoreTimeout, OnLine, Prepared, SetState
from runner.run.backends.common import (
    after_final,
    final_lock,
    harden_outputs,
    still_this_attempt,
    stop_with_second_interrupt,
)
from runner.run.hardening import unprivileged_user
from runner.run.jobs import CoreJob
from runner.run.records import Experiment, now_iso
from runner.run.spec import (
    LABEL_ATTEMPT,
    LABEL_EXPERIMENT,
    LABEL_WORKDIR,
    ContainerSpec,
    container_spec,
    workdir_identity,
)
from runner.settings import NodeSettings

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 16 << 20  # bytes of a one-shot job's stdout kept (discovery's document is at most 8 MiB)
STDERR_TAIL_LINES = 200


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

    def __init__(self, settings: NodeSettings, handle: EngineHandle | None = None, client=None):
        self.settings = settings
        self.handle = handle or EngineHandle(client)

    # --- before the experiment exists -------------------------------------------------------------

    def prepare(self, workdir: Path, gpus: GpuRequest, on_build_log: OnLine) -> Prepared:
        from runner import engine
        from runner.images.decide import decide_image

        client = self.handle.require()
        if gpus.requested and not engine.gpu_runtime_available(client):
            raise EnvironmentProblem(
                f"GPUs requested (--gpus {gpus.text()}) but the Docker engine has no GPU runtime: {engine.NVIDIA_HINT}"
            )
        decision = decide_image(client, workdir, on_build_log)
        return Prepared(decision.spec.content_hash, decision.spec.tag, decision.image_id, decision.spec)

    def ensure_image(self, prepared: Prepared, on_build_log: OnLine) -> str:
        """The image id of `prepared`, building it first when it is missing."""
        from runner.images import builds

        if prepared.image_id is not None:
            return prepared.image_id
        return builds.build(self.handle.require(), prepared.build, on_build_log).id

    def dry_prepare(self, workdir: Path) -> dict:
        from runner.images.decide import plan_images

        images = plan_images(self.handle.require(), workdir)
        plugin, base = images["plugins"], images["base"]["tag"]
        doc = {
            "image_hash": plugin.get("content_hash"),
            "base_image": base,
            "image": plugin.get("tag"),
            "image_id": plugin.get("id"),
            "image_exists": bool(plugin.get("exists")),
        }
        if plugin.get("tag") is None:
            doc["note"] = f"base image {base} is missing: 'infra run' builds it first (or 'infra build --base')"
        return doc

    def spec(self, job: CoreJob) -> ContainerSpec:
        return container_spec(job, user=unprivileged_user(settings=self.settings), settings=self.settings)

    def describe(self, job: CoreJob) -> dict:
        return {"container": self.spec(job).describe()}

    # --- one attempt of a training ----------------------------------------------------------------

    def start(
        self, exp: Experiment, job: CoreJob, prepared: Prepared, set_state: SetState, on_build_log: OnLine
    ) -> dict:
        from runner import engine

        client = self.handle.require()
        if prepared.image_id is None:
            set_state("building", image=prepared.image_tag)
        image_id = self.ensure_image(prepared, on_build_log)
        set_state("starting", image=prepared.image_tag, image_id=image_id)
        # A container of an earlier attempt of this experiment in this workdir (kept after a runner
        # crash) would hold the name; another workdir's containers are never touched.
        for old in engine.find_containers(client, self.labels(exp)):
            engine.remove_container(old)
        spec = self.spec(job.with_image(prepared.image_tag, image_id))
        give_places_to(job, spec.user)
        container = engine.run_container(client, spec.image, **spec.engine_kwargs())
        return set_state("running", container_id=container.id, started_at=now_iso())

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

    def follow(self, exp: Experiment, record: dict, on_log: OnLine) -> dict:
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
            from runner.run.logs import shorten_log

            shorten_log(exp, 1 << 20)
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

        if record.get("slot"):
            from runner.run.slots import stop_point

            return stop_point(self, exp, record, timeout, reason)
        self.handle.require()
        container = self.container(exp, record)
        if container is None:
            return self.reconcile(exp, record)
        stop_with_second_interrupt(lambda: engine.stop(container, timeout=timeout))
        return self.finish(exp, exp.read(), engine.wait(container), container, message=reason)

    def reconcile(self, exp: Experiment, record: dict) -> dict:
        from runner import engine
        from runner.run.reconcile import pid_alive

        if record.get("slot"):
            from runner.run.slots import reconcile_point

            return reconcile_point(self, exp, record)
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
            if not still_this_attempt(current, record):
                return current
            return _lost(exp, "the container is gone from the engine (removed or the engine was reset)")
        state = engine.container_state(container)
        if state["status"] == "removed":  # finalised by another reader just now
            record = exp.read()
            if record.get("state") in ("building", "starting", "running"):
                return _lost(exp, "the container was removed while running")
            return record
        if state["status"] in ("created", "running", "restarting", "paused"):
            return record if record.get("state") == "running" else exp.update(state="running")
        message = OUT_OF_MEMORY if state.get("oom_killed") else None
        return self.finish(exp, record, state["exit_code"], container, message=message)

    def finish(self, exp, record, exit_code, container, message=None) -> dict:
        """Save the log (when not captured live), record the final state, then remove the container.

        Serialised per experiment: the foreground runner and any number of `infra status` readers may
        see the same exited container; the first one finalises, the others find the final record.
        """
        from runner import engine, safefs
        from runner.run.logs import save_container_log
        from runner.run.reconcile import finalize

        if message is None and exit_code is not None and exit_code != 0:
            message = OUT_OF_MEMORY if engine.container_state(container).get("oom_killed") else None
        with final_lock(exp):
            current = exp.read()
            if not still_this_attempt(current, record):
                engine.remove_container(container)
                return current
            if not current.get("log_complete"):
                try:
                    save_container_log(exp, container)
                except (OSError, safefs.Tampered, EnvironmentProblem) as exc:
                    log.warning("could not save the log of %s: %s", exp.id, exc)
            record = finalize(exp, current, exit_code, message=message)
            engine.remove_container(container)
        return after_final(exp, record)

    def live_output(
        self, exp: Experiment, record: dict, on_line: OnLine, *, follow: bool, tail: int | None, keep_colors: bool
    ) -> bool:
        from runner import engine
        from runner.lines import LineSplitter, display_line

        if record.get("slot"):
            return False  # a study point's output is captured by its study runner into container.log
        container = self.container(exp, record)
        if container is None:
            return False
        splitter = LineSplitter(lambda line: on_line(display_line(line, keep_colors)))
        for chunk in engine.log_chunks(container, follow=follow, tail=tail):
            splitter.feed(chunk)
        splitter.close()
        return True

    # --- other core jobs ----------------------------------------------------------------------------

    def experiment_image(self, record: dict) -> tuple[str, str]:
        """(tag, image id) of the experiment's plugin image, after checking the untrusted record against
        the engine: a well-formed tag and id, the id present, labelled an infra plugin image of that hash."""
        from runner import engine
        from runner.errors import ExperimentFailed, UsageError

        client = self.handle.require()
        tag, image_id, eid = record.get("image"), record.get("image_id"), record.get("experiment_id")
        if record.get("backend") == "local" and not image_id:
            raise UsageError(f"experiment {eid} was trained with --backend local (no image); use --backend local")
        tag_match = IMAGE_TAG.fullmatch(tag) if isinstance(tag, str) else None
        if tag_match is None or not isinstance(image_id, str) or not IMAGE_ID.fullmatch(image_id):
            raise ExperimentFailed(
                f"experiment {eid}: its record names no valid infra image ({str(tag)[:80]!r}, {str(image_id)[:80]!r}); "
                "the record was altered or is damaged: run the plan again"
            )
        if not engine.image_exists(client, image_id):
            raise EnvironmentProblem(
                f"image {tag} ({image_id[:19]}) of experiment {eid} is no longer in the Docker engine: "
                "rebuild it with 'infra build' (same plugins) or run the plan again with --rerun"
            )
        labels = engine.image_labels(client, image_id)
        if labels.get("infra.kind") != "plugins" or not str(labels.get("infra.content_hash", "")).startswith(
            tag_match[1]
        ):
            raise ExperimentFailed(
                f"image {image_id[:19]} named by experiment {eid}'s record is not infra's plugin image {tag} "
                "(its infra.* labels do not match); refusing to run it"
            )
        return tag, image_id

    def predicts_members_together(self, image: tuple[str | None, str | None]) -> bool:
        from runner import engine
        from runner.images.builds import LABEL_CORE_API

        level = engine.image_labels(self.handle.require(), image[1]).get(LABEL_CORE_API) if image[1] else None
        return isinstance(level, str) and level.isdigit() and int(level) >= 2

    def run_once(self, job: CoreJob) -> CoreOutput:
        from runner import engine

        spec = self.spec(job)
        give_places_to(job, spec.user)  # the container's user writes the job's output folders
        client = self.handle.require()
        try:
            container = engine.run_container(client, spec.image, **spec.engine_kwargs())
        except KeyboardInterrupt:  # Ctrl-C/SIGTERM while the engine created it: remove it by its unique name
            made = engine.get_container(client, spec.name)
            if made is not None:
                engine.remove_container(made)
            raise
        try:
            try:
                code = engine.wait(container, timeout=job.timeout_s)
            except KeyboardInterrupt:
                engine.stop(container, timeout=5)
                raise
            except Exception as exc:  # the SDK's read timeout (requests) or an engine error
                if _timed_out(exc):
                    raise CoreTimeout(f"did not finish within {job.timeout_s} s ({type(exc).__name__})") from None
                raise EnvironmentProblem(
                    f"the Docker engine failed while the {job.verb} container ran ({type(exc).__name__}: "
                    f"{str(exc)[:300]}); check 'docker info' and try again"
                ) from None
            # stdout carries a job's document and stderr everything else: read them apart
            stdout = engine.container_output(container, stderr=False, limit=OUTPUT_LIMIT)
            stderr = engine.container_output(container, stdout=False, tail=STDERR_TAIL_LINES)
        finally:
            engine.remove_container(container)
        return CoreOutput(code, stdout.encode("utf-8", "surrogateescape"), stderr)

    def open_slot(self, job: CoreJob):
        from runner.run.backends.docker_slot import DockerSlot

        return DockerSlot.start(self, job)

    def slot_alive(self, ident: str) -> bool:
        from runner import engine

        client = self.handle.get()
        if client is None or not ident:
            return True  # cannot tell without the engine: the record stands
        container = engine.get_container(client, ident)
        return container is not None and engine.container_state(container)["status"] in ("created", "running")

    def engine_info(self) -> dict:
        from runner.node import docker_info

        return docker_info()


def _timed_out(exc: Exception) -> bool:
    """Whether waiting on the engine ended by the wait's own timeout (requests says so as a Timeout,
    or over the unix socket as a ConnectionError "Read timed out"), not by an engine failure."""
    import requests

    return isinstance(exc, requests.exceptions.Timeout) or (
        isinstance(exc, requests.exceptions.ConnectionError) and "timed out" in str(exc).lower()
    )


def _lost(exp: Experiment, message: str) -> dict:
    """Record a training whose container vanished as `lost`, after hardening what it left (as a
    finished attempt's outputs are: the container ran, so its files may carry setuid bits)."""
    problem = harden_outputs(exp)
    return exp.update(state="lost", finished_at=now_iso(), message=f"{message}; {problem}" if problem else message)


OUT_OF_MEMORY = "the training was killed: out of memory (resources.memory)"
IMAGE_TAG = re.compile(r"infra-plugins:([0-9a-f]{12})")
IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")


def give_places_to(job: CoreJob, user: str) -> None:
    """When infra runs as root and the container as another uid, the job's output folders must be theirs."""
    if os.geteuid() != 0:
        return
    uid, gid = (int(x) for x in user.split(":"))
    for place in job.places:
        if not place.read_only and place.host.is_dir() and not place.host.is_symlink():
            os.chown(place.host, uid, gid, follow_symlinks=False)
