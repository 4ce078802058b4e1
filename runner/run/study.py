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

import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from runner import safefs
from runner.errors import EXIT_EXPERIMENT_FAILED, EXIT_INTERRUPTED, EXIT_OK, InfraError
from runner.plan.models import GpuRequest
from runner.run.jobs import Limits, default_threads, slot_job
from runner.run.launch import LOCK_TIMEOUT_S, BuildLog, Target, decide, open_attempt, plan_gpus, preflight_paths
from runner.run.records import ACTIVE, Experiment, now_iso
from runner.run.slots import PointEnd, Slot, slot_dir, slot_name
from runner.run.spec import LABEL_PURPOSE, LABEL_SLOT, LABEL_STUDY
from runner.run.sweep import PointResult
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


def study_id(name: str, experiment_ids: list[str]) -> str:
    """`<name>-study-<10 hex>`: the same points make the same study (running it again is idempotent)."""
    digest = hashlib.sha256("\n".join(sorted(experiment_ids)).encode()).hexdigest()
    return f"{name}-study-{digest[:10]}"


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
        self.results = [PointResult(i, p) for i, p in enumerate(points, 1)]
        self.pending: queue.Queue[int] = queue.Queue()
        self.stopping = threading.Event()
        self.slots: dict[int, Slot] = {}
        self.lock = threading.Lock()
        self.error: InfraError | None = None
        self.done = 0

    # --- before any point runs ---------------------------------------------------------------------

    def prepare(self) -> None:
        settings = node_settings()
        first = self.loaded[0]
        self.gpus = plan_gpus(first, self.opts.gpus)
        for db in sorted({Path(lp.plan.data.db) for lp in self.loaded}):
            preflight_paths(db, self.workdir, settings)
        if any(lp.plan.tracking is not None for lp in self.loaded):
            from runner.run.tracking import require_client

            require_client(first.source)
        build_log = BuildLog(self.opts.on_build_log)
        self.prepared = self.backend.prepare(self.workdir, self.gpus, build_log.add)
        self.image_id = self.backend.ensure_image(self.prepared, build_log.add)
        self.targets = [Target.of(lp, self.workdir, self.prepared.image_hash, self.gpus) for lp in self.loaded]
        for result, target in zip(self.results, self.targets, strict=True):
            result.experiment_id, result.exp_dir = target.exp.id, str(target.exp.root)
        self.id = study_id(first.plan.name, [t.exp.id for t in self.targets])
        self.n_slots = max(1, min(self.opts.parallel or default_parallel(self.gpus), len(self.targets)))
        write_study(self.workdir, self.id, self.document())

    def document(self) -> dict:
        return {
            "study_id": self.id,
            "name": self.loaded[0].plan.name,
            "source": self.loaded[0].source,
            "keys": sorted({k for p in self.points for k in p}),
            "created_at": now_iso(),
            "backend": self.backend.name,
            "slots": self.n_slots,
            "points": [{"index": r.index, "values": r.values, "experiment_id": r.experiment_id} for r in self.results],
        }

    # --- running ----------------------------------------------------------------------------------------

    def run(self) -> tuple[list[PointResult], int]:
        self.prepare()
        for i in range(len(self.targets)):
            self.pending.put(i)
        work = self._isolated_worker if self.opts.isolated else self._slot_worker
        threads = [
            threading.Thread(target=work, args=(k,), name=f"study-slot-{k}", daemon=True) for k in range(self.n_slots)
        ]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(0.2)
        except KeyboardInterrupt:
            self.interrupt()
            from runner.run.backends.common import stop_with_second_interrupt

            stop_with_second_interrupt(lambda: [t.join() for t in threads])
        return self.results, self.exit_code()

    def interrupt(self) -> None:
        """Stop every running point gracefully; the points not started stay `not run`."""
        self.stopping.set()
        with self.lock:
            for slot in self.slots.values():
                try:
                    slot.request_stop()
                except OSError as exc:
                    log.warning("slot %s: could not ask it to stop: %s", slot.name, exc)

    def exit_code(self) -> int:
        if self.stopping.is_set():
            return EXIT_INTERRUPTED
        if self.error is not None:
            return self.error.exit_code
        return EXIT_EXPERIMENT_FAILED if any(r.state not in ("succeeded",) for r in self.results) else EXIT_OK

    def _next(self) -> int | None:
        if self.stopping.is_set() or self.error is not None:
            return None
        try:
            return self.pending.get_nowait()
        except queue.Empty:
            return None

    def _slot_worker(self, k: int) -> None:
        slot = None
        try:
            while (i := self._next()) is not None:
                slot = self._run_in_slot(k, i, slot)
        except InfraError as exc:  # the engine went away, a slot cannot start: the rest cannot run either
            self.error = self.error or exc
            log.warning("study %s: slot %d stopped: %s", self.id, k, exc.message)
        finally:
            if slot is not None:
                with self.lock:
                    self.slots.pop(k, None)
                slot.close()

    def _open_slot(self, k: int) -> Slot:
        first = self.loaded[0].plan
        gpus = slot_gpus(self.gpus, self.n_slots)[k]
        threads = Limits.from_resources(first.resources).threads or default_threads(self.n_slots)
        name = slot_name(self.id, k)
        directory = slot_dir(self.workdir, name)
        job = slot_job(
            slot_dir=directory,
            dbs=self.dbs,
            workdir=self.workdir,
            name=f"infra-slot-{name}",
            gpus=gpus,
            limits=Limits.from_resources(first.resources, threads),
            labels={LABEL_PURPOSE: "study-slot", LABEL_STUDY: self.id, LABEL_SLOT: name},
        ).with_image(self.prepared.image_tag, self.image_id)
        slot = Slot.open(self.backend, job, directory)
        with self.lock:
            self.slots[k] = slot
        return slot

    @property
    def dbs(self) -> tuple[Path, ...]:
        return tuple(sorted({Path(lp.plan.data.db) for lp in self.loaded}))

    def _run_in_slot(self, k: int, i: int, slot: Slot | None) -> Slot | None:
        target, result = self.targets[i], self.results[i]
        record = self._claim(target, result)
        if record is None:
            if result.state in ACTIVE:
                self._await_elsewhere(target.exp, result)
            self._finish_result(result)
            return slot
        if slot is None or slot.ended:
            if slot is not None:
                slot.close()
            try:
                slot = self._open_slot(k)
            except BaseException as exc:
                from runner.run.launch import fail_attempt

                fail_attempt(target.exp, exc)
                self._from_record(result, target.exp.read())
                self._finish_result(result)
                raise
        view = self.opts.point_view(result)
        on_event = view.get("on_event", lambda event: None)
        on_log = view.get("on_log", lambda line: None)
        end = self._run_point(slot, target, record, on_log, on_event)
        record = self._final(target.exp, record, end)
        on_event({"event": "state", "experiment_id": target.exp.id, "state": record["state"],
                  "exit_code": record.get("exit_code"), "outputs": str(target.exp.root)})  # fmt: skip
        self._from_record(result, record)
        self._finish_result(result)
        return None if end.slot_died else slot

    def _claim(self, target: Target, result: PointResult) -> dict | None:
        """Under the experiment's lock: report a point that succeeded (or runs elsewhere), else open an attempt."""
        exp = target.exp
        exp.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(exp.lock_path), timeout=LOCK_TIMEOUT_S):
            previous = decide(exp, self.backend)
            if previous and previous["state"] == "succeeded" and not self.opts.rerun:
                self._from_record(result, previous)
                result.reused = True
                return None
            if previous and previous["state"] in ACTIVE:
                self._from_record(result, previous)
                result.attached = True
                return None
            open_attempt(target, self.backend.name, previous, self.opts.rerun)
            return exp.update(state="starting", image=self.prepared.image_tag, image_id=self.image_id, study=self.id)

    def _await_elsewhere(self, exp: Experiment, result: PointResult) -> None:
        """A point another runner is running: wait for its end (as `infra run` attaches to it)."""
        from runner.run.reconcile import reconcile

        record = exp.read()
        while record.get("state") in ACTIVE and not self.stopping.is_set():
            time.sleep(1.0)
            record = reconcile(exp, self.backend)
        self._from_record(result, record)

    def _run_point(self, slot: Slot, target: Target, record: dict, on_log, on_event) -> PointEnd:
        from runner.lines import display_line
        from runner.run.logs import LogWriter

        exp = target.exp
        exp.update(slot={"name": slot.name, "seq": slot.seq + 1, "process": slot.process.ident, "study": self.id},
                   container_id=slot.process.container_id)  # fmt: skip
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

        try:
            end = slot.run_point(exp, request, on_line, on_begin)
        finally:
            writer.close()
            refused = slot.unstage(exp)
        if refused:
            names = ", ".join(refused)
            return PointEnd(1, f"the training left {names} as something other than a folder; refused (kept empty)")
        return end

    def _final(self, exp: Experiment, record: dict, end: PointEnd) -> dict:
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

    def _isolated_worker(self, k: int) -> None:
        """The old way: each point through `launch.run` (a fresh core process per point)."""
        from runner.errors import ExperimentFailed, Interrupted
        from runner.run.launch import RunOptions, run

        while (i := self._next()) is not None:
            result = self.results[i]
            opts = RunOptions(backend=self.backend, gpus=self.gpus, rerun=self.opts.rerun,
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
        from runner.run.records import metrics_summary

        if not record:
            return
        result.state = record.get("state") or result.state
        code = record.get("exit_code")
        result.exit_code = 0 if result.state == "succeeded" else code
        if result.state != "succeeded" and record.get("message"):
            result.message = record.get("message")
        metrics = metrics_summary(Path(result.exp_dir))
        result.test, result.val, result.n = metrics.get("test") or {}, metrics.get("val") or {}, metrics.get("n") or {}
        training = Experiment(Path(result.exp_dir)).read_json("metrics/metrics.json").get("training_seconds")
        result.training_seconds = training if isinstance(training, int | float) else None

    def _finish_result(self, result: PointResult) -> None:
        with self.lock:
            self.done += 1
            self.opts.on_done(result, len(self.results))


def run_study(
    loaded_plans: list, points: list[dict], workdir: Path, opts: StudyOptions
) -> tuple[list[PointResult], int, str | None]:
    """Run a study's points; (results in grid order, the exit code, the study id)."""
    study = Study(loaded_plans, points, workdir, opts)
    try:
        results, code = study.run()
    except InfraError as exc:  # before any point ran: no engine, a failed image build …
        for result in study.results:
            result.state, result.exit_code, result.message = "not run", exc.exit_code, None
        raise
    return results, code, getattr(study, "id", None)
