"""A study: the points of a sweep (or all folds) run through long-lived slots, several at once.

    points (validated LoadedPlans) → backend.prepare + the image built once → study record
    → N slot threads, each with one slot (`runner.run.slots`: one core process that imports once
    and reuses what points share) pulling the next point → per point: the same decision and attempt
    as `infra run` (`runner.run.launch`), then the slot runs it → results as points finish.

Each point stays an ordinary experiment: the id it would have alone, its own directory, record,
events, `container.log`, checkpoints and resume; a point that already succeeded is reported, not
rerun; one that another runner is running is reported as such and left to it. A point that fails
fails alone; a slot that dies takes only its running point with it (recorded `failed` with the
reason) and the next point gets a fresh slot. Ctrl-C stops every running point gracefully
(checkpoints, `cancelled`) and leaves the rest `not run`. `isolated=True` runs each point through
`launch.run` instead (one process per point, as a single run: for plugins that keep global state).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from runner import safefs
from runner.errors import EXIT_EXPERIMENT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EnvironmentProblem, InfraError
from runner.plan.models import GpuRequest
from runner.run.jobs import Limits, default_threads, plm_places
from runner.run.lanes import Lane, LaneSpec, await_elsewhere, claim
from runner.run.launch import (
    BuildLog,
    Target,
    check_components,
    fail_attempt,
    plan_gpus,
    preflight_paths,
    refuse_other_plan,
)
from runner.run.records import ACTIVE, Experiment, now_iso
from runner.run.sweep import PointResult, point_label
from runner.settings import node_settings

log = logging.getLogger(__name__)

STUDIES_DIR = "studies"


@dataclass
class StudyOptions:
    backend: object
    gpus: GpuRequest | None = None  # --gpus, parsed; None: the first point's resources.gpus
    parallel: int | None = None  # slots at once; None: one per GPU given, else 1
    rerun: bool = False
    stop_timeout: int = 60
    isolated: bool = False  # one process per point (launch.run), no slots
    # what the caller shows: a point's callbacks (on_log, on_event) and its end
    point_view: Callable[[PointResult], dict] = field(default=lambda result: {})
    on_done: Callable[[PointResult, int], None] = field(default=lambda result, total: None)
    on_build_log: Callable[[str], None] = field(default=lambda line: None)


def default_parallel(gpus: GpuRequest) -> int:
    """One slot per GPU a study is given (`--gpus 0,1`, or every GPU NVML sees for `all`), else one."""
    if gpus.kind == "devices":
        return len(gpus.devices)
    if gpus.kind == "all":
        from runner.node import gpu_indices

        return max(1, len(gpu_indices()))
    return 1


def slot_gpus(gpus: GpuRequest, slots: int) -> list[GpuRequest]:
    """The GPUs of each slot: one device each when the study has them, else the study's request."""
    if gpus.kind == "all":
        from runner.node import gpu_indices

        found = gpu_indices()
        if found:
            gpus = GpuRequest(kind="devices", devices=tuple(int(i) for i in found))
    if gpus.kind == "devices" and slots > len(gpus.devices):
        from runner.errors import UsageError

        raise UsageError(f"--parallel {slots}: more slots than the {len(gpus.devices)} GPU(s) given ({gpus.text()})")
    return gpus.split(slots)


def study_id(names: list[str], experiment_ids: list[str]) -> str:
    """`<name>-study-<10 hex>`: the same points make the same study (running it again is idempotent)."""
    digest = hashlib.sha256("\n".join(sorted(experiment_ids)).encode()).hexdigest()
    return f"{study_name(names)}-study-{digest[:10]}"


def study_name(names: list[str]) -> str:
    """What the points' names share: a plan's `name` without placeholders is every point's name; with
    them (`blat-{model.name}-s{train.seed}`) the common part up to its last separator (`blat`), never
    the first point's filled name. `study` when they share nothing."""
    common = os.path.commonprefix(names) if names else ""
    if common and any(n != common for n in names):
        cut = max(common.rfind(c) for c in "-_.")
        common = common[:cut] if cut > 0 else ""
    return common.rstrip("-_.") or "study"


def stop_marker(workdir: Path, sid: str) -> Path:
    """`studies/<id>.stop`: `infra stop STUDY` asks the study's runner (wherever it runs on this
    workdir) to start no further point and to stop the running ones."""
    return Path(workdir) / STUDIES_DIR / f"{sid}.stop"


def request_study_stop(workdir: Path, sid: str, reason: str) -> None:
    root = Path(workdir) / STUDIES_DIR
    safefs.write_atomic(root, f"{sid}.stop", (reason + "\n").encode())


def write_study(workdir: Path, sid: str, doc: dict) -> Path:
    """The study's record `<workdir>/studies/<id>.json` (host-written, atomic)."""
    root = Path(workdir) / STUDIES_DIR
    root.mkdir(parents=True, exist_ok=True)
    safefs.write_atomic(root, f"{sid}.json", (json.dumps(doc, indent=2) + "\n").encode())
    return root / f"{sid}.json"


class Study:
    """One run of a study (see the module docstring)."""

    def __init__(self, loaded_plans: list, points: list[dict], workdir: Path, opts: StudyOptions):
        self.loaded = loaded_plans
        self.points = points
        self.workdir = workdir
        self.opts = opts
        self.backend = opts.backend
        self.results = [PointResult(i, p, point_label(p)) for i, p in enumerate(points, 1)]
        self.pending: queue.Queue[int] = queue.Queue()
        self.stopping = threading.Event()
        self.lanes: list[Lane] = []
        self.lock = threading.Lock()
        self.error: InfraError | None = None

    # --- before any point runs ---------------------------------------------------------------------

    def prepare(self) -> None:
        settings = node_settings()
        first = self.loaded[0]
        self.gpus = plan_gpus(first, self.opts.gpus)
        dbs = tuple(sorted({Path(lp.plan.data.db) for lp in self.loaded}))
        for db in dbs:
            preflight_paths(db, self.workdir, settings)
        if any(lp.plan.tracking is not None for lp in self.loaded):
            from runner.run.tracking import require_client

            for lp in self.loaded:
                if lp.plan.tracking is not None:
                    require_client(lp.source, lp.plan.tracking.mlflow_uri)
        build_log = BuildLog(self.opts.on_build_log)
        self.prepared = self.backend.prepare(self.workdir, self.gpus, build_log.add)
        self.image_id = self.backend.ensure_image(self.prepared, build_log.add)
        labels = [point_label(p) for p in self.points]
        check_components(self.loaded, self.workdir, self.backend, self.prepared, build_log.add, labels)
        self.targets = [Target.of(lp, self.workdir, self.prepared.image_hash, self.gpus) for lp in self.loaded]
        for result, target in zip(self.results, self.targets, strict=True):
            result.experiment_id, result.exp_dir = target.exp.id, str(target.exp.root)
        self.id = study_id([lp.plan.name for lp in self.loaded], [t.exp.id for t in self.targets])
        n_slots = max(1, min(self.opts.parallel or default_parallel(self.gpus), len(self.targets)))
        threads = Limits.from_resources(first.plan.resources).threads or default_threads(n_slots)
        models = plm_places([lp.plan for lp in self.loaded], self.workdir, settings)
        for k, gpus in enumerate(slot_gpus(self.gpus, n_slots)):
            spec = LaneSpec(self.backend, self.workdir, self.prepared.image_tag, self.image_id, dbs, gpus,
                            Limits.from_resources(first.plan.resources, threads), self.id, models)  # fmt: skip
            self.lanes.append(Lane(spec, k))
        write_study(self.workdir, self.id, self.document())
        stop_marker(self.workdir, self.id).unlink(missing_ok=True)  # a stop asked of an earlier run

    def document(self) -> dict:
        return {
            "study_id": self.id,
            "name": study_name([lp.plan.name for lp in self.loaded]),
            "source": self.loaded[0].source,
            "keys": sorted({k for p in self.points for k in p}),
            "created_at": now_iso(),
            "backend": self.backend.name,
            "slots": len(self.lanes),
            "points": [
                {"index": r.index, "values": r.values, "label": r.label, "experiment_id": r.experiment_id}
                for r in self.results
            ],
        }

    # --- running ----------------------------------------------------------------------------------------

    def run(self) -> tuple[list[PointResult], int]:
        self.prepare()
        for i in range(len(self.targets)):
            self.pending.put(i)
        work = self._isolated_worker if self.opts.isolated else self._lane_worker
        # Each lane says it has ended with an Event, not by Thread.join: a Ctrl-C that interrupts join()
        # can mark a running thread as stopped (CPython 3.11's bpo-45274 handling in
        # _wait_for_tstate_lock), and the runner then exited while a lane was still closing its slot.
        ended = [threading.Event() for _ in self.lanes]

        def lane_thread(lane, done: threading.Event) -> None:
            try:
                work(lane)
            finally:
                done.set()

        for lane, done in zip(self.lanes, ended, strict=True):
            threading.Thread(target=lane_thread, args=(lane, done), daemon=True).start()
        marker = stop_marker(self.workdir, self.id)
        try:
            while not all(done.is_set() for done in ended):
                time.sleep(0.2)
                if not self.stopping.is_set() and marker.exists():  # infra stop STUDY
                    log.warning("study %s: stopped with 'infra stop'; no further point starts", self.id)
                    self.interrupt()
        except KeyboardInterrupt:
            self.interrupt()
            from runner.run.backends.common import stop_with_second_interrupt

            stop_with_second_interrupt(lambda: [done.wait() for done in ended])
        return self.results, self.exit_code()

    def interrupt(self) -> None:
        """Stop every running point gracefully; the points not started stay `not run`."""
        self.stopping.set()
        for lane in self.lanes:
            try:
                lane.request_stop()
            except OSError as exc:
                log.warning("study %s: could not ask a slot to stop: %s", self.id, exc)

    def exit_code(self) -> int:
        if self.stopping.is_set():
            return EXIT_INTERRUPTED
        if self.error is not None:
            return self.error.exit_code
        return EXIT_EXPERIMENT_FAILED if any(r.state != "succeeded" for r in self.results) else EXIT_OK

    def _next(self) -> int | None:
        if self.stopping.is_set() or self.error is not None:
            return None
        try:
            return self.pending.get_nowait()
        except queue.Empty:
            return None

    def _lane_worker(self, lane: Lane) -> None:
        from runner.run import tracking_live

        try:
            while (i := self._next()) is not None:
                target, result = self.targets[i], self.results[i]
                record = None
                try:
                    previous, record = claim(target, self.backend, self.opts.rerun, self.prepared.image_tag,
                                             self.image_id, self.id)  # fmt: skip
                    if record is None:
                        result.reused = previous["state"] == "succeeded"
                        result.attached = not result.reused
                        record = await_elsewhere(target.exp, self.backend, self.stopping)
                    else:
                        record = lane.run(target, record, self.opts.point_view(result))
                    self._from_record(result, record)
                except InfraError as exc:  # the engine went away, a slot cannot start: the rest cannot run either
                    result.state, result.exit_code, result.message = "error", exc.exit_code, exc.message
                    self.error = self.error or exc
                    log.warning("study %s: %s", self.id, exc.message)
                except Exception as exc:  # an OS error (disk, lock) or a bug: the point fails with it, said
                    log.exception("study %s: point %s", self.id, target.exp.id)
                    if record is not None and record.get("state") in ACTIVE:  # not left `starting` forever
                        with contextlib.suppress(OSError):
                            fail_attempt(target.exp, exc)
                    error = (EnvironmentProblem if isinstance(exc, OSError) else InfraError)(
                        f"point {target.exp.id}: {type(exc).__name__}: {exc}"
                    )
                    if not isinstance(exc, OSError):
                        error.exit_code = EXIT_EXPERIMENT_FAILED  # not the user's input: a failure
                    self.error = self.error or error
                    result.state, result.exit_code, result.message = "error", error.exit_code, error.message
                finally:
                    tracking_live.end(target.exp)  # a live MLflow client no final record took (it failed)
                    self._finish_result(result)
        finally:
            lane.close()

    def _isolated_worker(self, lane: Lane) -> None:
        """The old way: each point through `launch.run` (a fresh core process per point)."""
        from runner.errors import ExperimentFailed, Interrupted
        from runner.run.launch import RunOptions, run

        while (i := self._next()) is not None:
            result = self.results[i]
            opts = RunOptions(backend=self.backend, gpus=lane.spec.gpus, rerun=self.opts.rerun,
                              stop_timeout=self.opts.stop_timeout, **self.opts.point_view(result))  # fmt: skip
            try:
                outcome = run(self.loaded[i], self.workdir, opts)
            except (ExperimentFailed, Interrupted) as exc:
                self._from_record(result, getattr(exc, "record", None))
                result.message = exc.message
                if isinstance(exc, Interrupted):
                    self.stopping.set()
            except InfraError as exc:
                result.state, result.exit_code, result.message = "error", exc.exit_code, exc.message
                self.error = self.error or exc
            else:
                self._from_record(result, outcome.record)
                result.reused = outcome.reused
            self._finish_result(result)

    # --- results ----------------------------------------------------------------------------------------

    def _from_record(self, result: PointResult, record: dict | None) -> None:
        point_result_from(result, record)

    def _finish_result(self, result: PointResult) -> None:
        with self.lock:
            self.opts.on_done(result, len(self.results))


def point_result_from(result: PointResult, record: dict | None) -> None:
    """A point's result from its record and its metrics (read as untrusted files)."""
    from runner.run.records import metrics_summary, outcome_summary

    if not record:
        return
    result.state = record.get("state") or result.state
    result.exit_code = 0 if result.state == "succeeded" else record.get("exit_code")
    if result.state != "succeeded" and record.get("message"):
        result.message = record.get("message")
    if not result.exp_dir:
        return
    metrics = metrics_summary(Path(result.exp_dir))
    outcome = outcome_summary(Path(result.exp_dir))
    result.kept, result.undefined = outcome["kept"], outcome["undefined"]
    result.test, result.val, result.n = metrics.get("test") or {}, metrics.get("val") or {}, metrics.get("n") or {}
    training = Experiment(Path(result.exp_dir)).read_json("metrics/metrics.json").get("training_seconds")
    result.training_seconds = training if isinstance(training, int | float) else None


def run_study(
    loaded_plans: list, points: list[dict], workdir: Path, opts: StudyOptions
) -> tuple[list[PointResult], int, str | None]:
    """Run a study's points; (results in grid order, the exit code, the study id)."""
    study = Study(loaded_plans, points, workdir, opts)
    return (*study.run(), study.id)


def dry_run_study(loaded_plans: list, points: list[dict], workdir: Path, opts: StudyOptions) -> dict:
    """What running the study would do, building and starting nothing: each point's id and whether it
    would run, resume (from its last checkpoint), or be reported (already succeeded).

    The components of every point are checked as a run checks them when the image exists (or from
    the node's cache); without an image (docker, before its first build) ids are not known yet."""
    from runner.run.backends import backend_of
    from runner.workdir.components import cached, check_plans

    backend = opts.backend
    gpus = plan_gpus(loaded_plans[0], opts.gpus)
    images = backend.dry_prepare(workdir)
    image_hash = images.pop("image_hash", None)
    doc = {"backend": backend.name, "workdir": str(workdir), **images, "points": []}
    comps = cached(image_hash) if image_hash else None
    if comps is not None:
        labels = [point_label(p) for p in points]
        issues = check_plans([lp.plan for lp in loaded_plans], comps, labels)
        if issues:
            from runner.errors import PlanError

            raise PlanError(loaded_plans[0].source, issues)
    doc["components_checked"] = comps is not None
    targets = [Target.of(lp, workdir, image_hash, gpus) for lp in loaded_plans]
    ids = [t.exp.id for t in targets] if image_hash else []
    doc["study_id"] = study_id([lp.plan.name for lp in loaded_plans], ids) if ids else None
    for i, (point, target) in enumerate(zip(points, targets, strict=True), 1):
        action = "run"
        if image_hash and target.exp.exists():
            record = target.exp.read()
            state = record.get("state")
            if not opts.rerun:
                refuse_other_plan(target, record)
            if state in ACTIVE:
                from runner.run.reconcile import reconcile

                state = reconcile(target.exp, backend_of(record)).get("state")
            if state == "succeeded":
                action = "report (already succeeded)" if not opts.rerun else "run again (--rerun)"
            elif state in ACTIVE:
                action = f"wait ({state} in another runner)"
            else:
                resumes = (target.exp.root / "ckpts" / "last.ckpt").is_file()
                action = f"resume ({state}; from ckpts/last.ckpt)" if resumes else f"run again ({state})"
        doc["points"].append({
            "index": i,
            "values": point,
            "label": point_label(point),
            "experiment_id": target.exp.id if image_hash else None,
            "action": action,
        })  # fmt: skip
    return doc
