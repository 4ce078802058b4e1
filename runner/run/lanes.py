"""Lanes: a study's points one after another through one slot (`runner.run.slots`), and the queue
worker's warm lane kept between jobs.

    claim (under the experiment's lock: report it, wait for it, or open an attempt, as `infra run`
    decides) → Lane.run (the slot, opened on first use and again after it died, runs the point; its
    output goes to the point's own container.log) → the final record, hardened and tracked once.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from runner.errors import EXIT_OK
from runner.plan.models import GpuRequest
from runner.run.jobs import Limits, ModelPlaces, plm_places, slot_job
from runner.run.launch import (
    LOCK_TIMEOUT_S,
    BuildLog,
    Target,
    check_components,
    decide,
    open_attempt,
    plan_gpus,
    preflight_paths,
)
from runner.run.records import ACTIVE, Experiment, now_iso
from runner.run.slots import PointEnd, Slot, slot_dir, slot_name
from runner.run.spec import LABEL_PURPOSE, LABEL_SLOT, LABEL_STUDY
from runner.settings import node_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaneSpec:
    """What a lane's slots are made of: one image, the databases they read, GPUs and CPU share, labels,
    and the model store and embedding cache when a point uses the plm embedding."""

    backend: object
    workdir: Path
    image_tag: str | None
    image_id: str | None
    dbs: tuple[Path, ...]
    gpus: GpuRequest
    limits: Limits
    group: str  # the study id (or a worker's key): slot names and the infra.study label
    models: ModelPlaces | None = None

    def key(self) -> tuple:
        return (self.image_id, self.image_tag, self.dbs, self.gpus, self.limits, str(self.workdir), self.models)


class Lane:
    """Points one after another through one slot, opened on first use and again after a slot died.

    A study runs one lane per slot; a queue worker keeps one lane warm between jobs of the same image
    and databases (`runner.queue.job`).
    """

    def __init__(self, spec: LaneSpec, index: int = 0):
        self.spec = spec
        self.index = index
        self.slot: Slot | None = None
        self.lock = threading.Lock()
        self.stopped = False  # asked to stop: a point not yet handed to the slot is not started

    def _open(self) -> Slot:
        name = slot_name(self.spec.group, self.index)
        directory = slot_dir(self.spec.workdir, name)
        job = slot_job(
            slot_dir=directory,
            dbs=self.spec.dbs,
            workdir=self.spec.workdir,
            name=f"infra-slot-{name}",
            gpus=self.spec.gpus,
            limits=self.spec.limits,
            labels={LABEL_PURPOSE: "study-slot", LABEL_STUDY: self.spec.group, LABEL_SLOT: name},
            idle_exit_s=self.spec.backend.settings.slot_idle_exit,
            alive_timeout_s=self.spec.backend.settings.slot_alive_timeout,
            models=self.spec.models,
        ).with_image(self.spec.image_tag, self.spec.image_id)
        return Slot.open(self.spec.backend, job, directory)

    def request_stop(self) -> None:
        with self.lock:
            self.stopped = True
            if self.slot is not None and not self.slot.ended and self.slot.seq:
                self.slot.request_stop()

    def close(self) -> None:
        with self.lock:
            slot, self.slot = self.slot, None
        if slot is not None:
            slot.close()

    def run(self, target: Target, record: dict, view: dict) -> dict:
        """Run one claimed point (its attempt opened: `claim`) to its end; its final record.

        Ctrl-C (KeyboardInterrupt in this thread) stops the point gracefully and records it.
        """
        exp = target.exp
        on_event = view.get("on_event", lambda event: None)
        with self.lock:
            if self.stopped:
                return _final(exp, record, PointEnd(130, "interrupted before it started"))
            if self.slot is not None and self.slot.ended:
                self.slot.close()
                self.slot = None
            if self.slot is None:
                try:
                    self.slot = self._open()
                except BaseException as exc:
                    from runner.run.launch import fail_attempt

                    fail_attempt(exp, exc)
                    raise
            slot = self.slot
        end = self._run_point(slot, target, record, view.get("on_log", lambda line: None), on_event)
        record = _final(exp, record, end)
        on_event({"event": "state", "experiment_id": exp.id, "state": record["state"],
                  "exit_code": record.get("exit_code"), "outputs": str(exp.root)})  # fmt: skip
        return record

    def _run_point(self, slot: Slot, target: Target, record: dict, on_log, on_event) -> PointEnd:
        from runner.lines import display_line
        from runner.run.logs import LogWriter

        exp = target.exp
        exp.update(slot={"name": slot.name, "seq": slot.seq + 1, "process": slot.process.ident,
                         "study": self.spec.group}, container_id=slot.process.container_id)  # fmt: skip
        on_event({"event": "state", "experiment_id": exp.id, "state": "starting", "attempt": record["attempt"]})
        writer = LogWriter(exp.root)
        db_place = next(p for p in slot.job.places if p.host == target.db)
        request = {"plan": "config/plan.json", "db": slot.path(db_place)}

        def on_line(line: bytes) -> None:
            writer.write_line(line)
            writer.flush()
            on_log(display_line(line, keep_colors=True))

        def on_begin() -> None:
            exp.update(state="running", started_at=now_iso())
            outputs = str(slot.process.outputs(exp))
            on_event({"event": "state", "experiment_id": exp.id, "state": "running", "outputs": outputs})
            if self.stopped:  # a stop that came while the point was being handed over had no number to name
                slot.request_stop()

        try:
            try:
                end = slot.run_point(exp, request, on_line, on_begin)
            except KeyboardInterrupt:  # Ctrl-C in the thread that runs the point (a worker's second signal)
                slot.request_stop()
                end = _finish_after_stop(slot, on_line)
        finally:
            writer.close()
            refused = slot.unstage(exp)
        if refused:
            names = ", ".join(refused)
            return PointEnd(1, f"the training left {names} as something other than a folder; refused (kept empty)")
        return end


def _finish_after_stop(slot: Slot, on_line) -> PointEnd:
    """After Ctrl-C asked the point to stop: read the rest of its output until it ends (a second Ctrl-C
    is swallowed: the stop and the record complete)."""
    from runner.run.backends.common import stop_with_second_interrupt

    ended: list[PointEnd] = []
    stop_with_second_interrupt(lambda: ended.append(slot.run_rest(on_line)))
    return ended[0] if ended else PointEnd(None, "interrupted (Ctrl-C)")


def claim(target: Target, backend, rerun: bool, image_tag: str | None, image_id: str | None, group: str):
    """Under the experiment's lock: (the existing record, None) for a point that succeeded (and no
    --rerun) or that another runner is running; else (None, the record of a new attempt, `starting`)."""
    exp = target.exp
    exp.lock_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(exp.lock_path), timeout=LOCK_TIMEOUT_S):
        previous = decide(target, backend, rerun)
        if previous and (previous["state"] in ACTIVE or (previous["state"] == "succeeded" and not rerun)):
            return previous, None
        open_attempt(target, backend.name, previous, rerun)
        return None, exp.update(state="starting", image=image_tag, image_id=image_id, study=group)


def _final(exp: Experiment, record: dict, end: PointEnd) -> dict:
    """Record how the point ended, once (an `infra status` reader may race for it), then harden and track."""
    from runner.run.backends.common import after_final, final_lock, still_this_attempt
    from runner.run.reconcile import finalize

    with final_lock(exp):
        current = exp.read()
        if not still_this_attempt(current, record):
            return current
        current = exp.update(log_complete=True)
        record = finalize(exp, current, end.exit_code, message=end.message)
    return after_final(exp, record)


def await_elsewhere(exp: Experiment, backend, stopping: threading.Event | None = None) -> dict:
    """A point another runner is running: wait for its end (as `infra run` attaches to it)."""
    from runner.run.reconcile import reconcile

    record = exp.read()
    while record.get("state") in ACTIVE and not (stopping is not None and stopping.is_set()):
        time.sleep(1.0)
        record = reconcile(exp, backend)
    return record


class WarmLane:
    """The lane a queue worker keeps between jobs (`infra worker`): a job of the same image and database
    as the last one runs in the same slot, without a new start-up; another makes a new slot."""

    def __init__(self, group: str):
        self.group = group
        self.lane: Lane | None = None

    def run(self, loaded, workdir: Path, opts):
        """`launch.run` for one queued plan, through the warm slot; the same outcome and errors."""
        from runner.run.launch import RunOutcome, outcome_of

        backend = opts.backend
        gpus = plan_gpus(loaded, opts.gpus)
        preflight_paths(Path(loaded.plan.data.db), workdir, node_settings())
        if loaded.plan.tracking is not None:
            from runner.run.tracking import require_client

            require_client(loaded.source, loaded.plan.tracking.mlflow_uri)
        build_log = BuildLog(opts.on_log)
        prepared = backend.prepare(workdir, gpus, build_log.add)
        image_id = backend.ensure_image(prepared, build_log.add)
        # as `launch.run` and a study do: unknown components or parameters refused before anything exists
        check_components([loaded], workdir, backend, prepared, build_log.add)
        target = Target.of(loaded, workdir, prepared.image_hash, gpus)
        spec = LaneSpec(backend, workdir, prepared.image_tag, image_id, (target.db,), gpus,
                        Limits.from_resources(loaded.plan.resources), self.group,
                        plm_places([loaded.plan], workdir, backend.settings))  # fmt: skip
        if self.lane is not None and self.lane.spec.key() != spec.key():
            self.close()
        self.lane = self.lane or Lane(spec)
        previous, record = claim(target, backend, opts.rerun, prepared.image_tag, image_id, self.group)
        if record is None:
            if previous["state"] == "succeeded":
                return RunOutcome(target.exp.id, target.exp.root, previous, EXIT_OK, reused=True)
            return outcome_of(target.exp, await_elsewhere(target.exp, backend), attached=True)
        record = self.lane.run(target, record, {"on_log": opts.on_log, "on_event": opts.on_event})
        return outcome_of(target.exp, record)

    def close(self) -> None:
        if self.lane is not None:
            self.lane.close()
            self.lane = None
