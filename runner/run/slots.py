"""Study slots, host side: one long-lived core process that runs a study's points one after another.

A slot imports torch and Lightning, loads the plugins and reads the selected rows once, then runs
point after point (`runner.core.slot` in the core). The host talks to it through files in the
slot's control folder (`<workdir>/experiments/.slots/<name>/control`, written only by the host;
read-only in a container):

    point-000001.json   the next point: its experiment id, where its folders are, its plan, its database
    stop-000001         stop that point gracefully (checkpoint; it ends `cancelled`)
    alive               touched every few seconds; when it goes stale (the host was killed) the slot
                        stops its point and exits
    quit                the host is done: the slot exits once idle

and reads the slot's output, which marks where each point's lines begin and end
(`@@infra-slot begin SEQ ID` … `@@infra-slot end SEQ CODE`). Each point's lines go into that point's
own `container.log`; its exit code decides its final state exactly as a single run's does. A
point that raises ends with its own exit code and the slot goes on; a slot process that dies
(segfault, out of memory) takes only its current point with it, which is recorded `failed` with the
reason, and the study opens a fresh slot for the rest.

The docker backend cannot add mounts to a running container, so a slot container mounts one
points folder, and each point's output folders are moved (renamed, same filesystem) into it while
the point runs and back when it ends (`stage_outputs` / `unstage_outputs`); the host checks what
comes back like any container-made tree and fails closed. The local backend runs the core on the
experiment directory itself.

Trust: a slot runs one study's points with one image and one user; plugin code in the slot can
reach the output folders of the point it runs, as a single run's can, and write its own output
markers (it could misreport its own study's points, as it can already write their metrics), but
never the host's records or anything outside its mounts.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runner import safefs
from runner.errors import EnvironmentProblem
from runner.lines import LineSplitter
from runner.run.jobs import (
    SLOT_ALIVE,
    SLOT_ALIVE_INTERVAL_S,
    SLOT_MARK,
    SLOT_QUIT,
    CoreJob,
    Place,
    slot_point_file,
    slot_stop_file,
)
from runner.run.records import ACTIVE, MOUNTED_DIRS, Experiment, experiments_root, now_iso

log = logging.getLogger(__name__)

SLOTS_DIR = ".slots"
OUTPUT_TAIL_LINES = 200  # slot output outside any point, kept to explain a slot that dies before a point starts
STOP_GRACE_S = 30  # beyond the stop timeout, how long `infra stop` waits for the study runner to record the end


def slot_dir(workdir: Path, name: str) -> Path:
    return experiments_root(workdir) / SLOTS_DIR / name


def describe_exit(code: int | None) -> str:
    """Why a process ended, in words."""
    if code is None:
        return "it vanished without an exit code"
    names = {137: "killed (SIGKILL: out of memory or killed by hand)", 139: "a segmentation fault (SIGSEGV)",
             134: "aborted (SIGABRT)", 143: "stopped (SIGTERM)"}  # fmt: skip
    return names.get(code, f"exit code {code}")


# --- moving a point's output folders into a slot's points folder and back -----------------------------


def stage_outputs(points: Path, exp: Experiment, owner: tuple[int, int] | None) -> None:
    """Move the experiment's output folders into `points/<id>/` (renames: same filesystem, O(1))."""
    with safefs.open_dir(points) as points_fd:
        # whatever an earlier point (or a crash) left under this name
        safefs.remove_entry(points_fd, exp.id, points / exp.id)
        os.mkdir(exp.id, 0o700, dir_fd=points_fd)
        if owner is not None:
            os.chown(exp.id, *owner, dir_fd=points_fd, follow_symlinks=False)
    with safefs.open_dir(exp.root) as src, safefs.open_dir(points, exp.id) as dst:
        for name in MOUNTED_DIRS:
            if owner is not None:  # infra runs as root, the training as another uid: the folders are theirs
                os.chown(name, *owner, dir_fd=src, follow_symlinks=False)
            os.replace(name, name, src_dir_fd=src, dst_dir_fd=dst)


def unstage_outputs(points: Path, exp: Experiment) -> list[str]:
    """Move the output folders back from `points/<id>/`; returns what had to be refused.

    What comes back was in the container's hands: a folder that is no longer a real directory
    (a link, a file) is not moved back but replaced by an empty folder, and named in the result;
    anything else the core left in `points/<id>/` is removed without following links.
    """
    refused = []
    try:
        ctx = safefs.open_dir(points, exp.id)
        src = ctx.__enter__()
    except FileNotFoundError:
        return refused
    except safefs.Tampered:
        with safefs.open_dir(points) as points_fd:
            safefs.remove_entry(points_fd, exp.id, points / exp.id)
        refused = list(MOUNTED_DIRS)
    else:
        try:
            with safefs.open_dir(exp.root) as dst:
                for name in MOUNTED_DIRS:
                    try:
                        mode = os.stat(name, dir_fd=src, follow_symlinks=False).st_mode
                    except FileNotFoundError:
                        refused.append(name)
                        continue
                    if not stat.S_ISDIR(mode):
                        refused.append(name)
                        continue
                    # a folder of the layout the host made meanwhile (empty)
                    safefs.remove_entry(dst, name, exp.root / name)
                    os.replace(name, name, src_dir_fd=src, dst_dir_fd=dst)
        finally:
            ctx.__exit__(None, None, None)
        with safefs.open_dir(points) as points_fd:
            safefs.remove_entry(points_fd, exp.id, points / exp.id)
    with safefs.open_dir(exp.root) as dst:
        for name in refused:
            safefs.remove_entry(dst, name, exp.root / name)
            os.mkdir(name, dir_fd=dst)
    return refused


# --- the slot seen from the host -----------------------------------------------------------------------


@dataclass
class PointEnd:
    """How a point ended in its slot: the core's exit code (None when the slot died), and why."""

    exit_code: int | None
    message: str | None = None
    slot_died: bool = False


class Slot:
    """One slot: its control folder, its core process (`backend.open_slot`), the point it runs."""

    def __init__(self, backend, job: CoreJob, directory: Path):
        self.backend = backend
        self.job = job
        self.dir = directory
        self.process = None
        self.seq = 0
        self.lines: queue.Queue[bytes | None] = queue.Queue(maxsize=10_000)
        self.outside: deque[bytes] = deque(maxlen=OUTPUT_TAIL_LINES)  # output between points
        self._stop_beating = threading.Event()
        self.ended = False
        self.started = False  # the current point's begin marker was seen
        self.begin = b""
        self.on_begin: Callable[[], None] = lambda: None

    @property
    def name(self) -> str:
        return self.dir.name

    @classmethod
    def open(cls, backend, job: CoreJob, directory: Path) -> Slot:
        """Make the slot's folders and start its process, its output reader and its heartbeat."""
        slot = cls(backend, job, directory)
        for sub in ("control", "points"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(directory / "control", 0o755)
        os.chmod(directory / "points", 0o700)
        slot._touch_alive()
        slot.process = backend.open_slot(job)
        threading.Thread(target=slot._read, name=f"slot-{slot.name}-output", daemon=True).start()
        threading.Thread(target=slot._beat, name=f"slot-{slot.name}-alive", daemon=True).start()
        return slot

    def _touch_alive(self) -> None:
        safefs.write_atomic(self.dir / "control", SLOT_ALIVE, now_iso().encode(), mode=0o644)

    def _beat(self) -> None:
        while not self._stop_beating.wait(SLOT_ALIVE_INTERVAL_S):
            try:
                self._touch_alive()
            except OSError as exc:  # the slot stops on its own once the file goes stale
                log.warning("slot %s: cannot touch its alive file: %s", self.name, exc)

    def _read(self) -> None:
        splitter = LineSplitter(self.lines.put)
        try:
            for chunk in self.process.chunks():
                splitter.feed(chunk)
            splitter.close()
        except Exception as exc:  # the engine went away: the slot counts as dead, the reason is logged
            log.warning("slot %s: its output could not be read: %s", self.name, exc)
        finally:
            self.lines.put(None)

    def path(self, place: Place) -> str:
        """Where the slot's process sees `place`."""
        return self.process.path(place)

    def run_point(self, exp: Experiment, request: dict, on_line: Callable[[bytes], None], on_begin) -> PointEnd:
        """Hand the point to the slot and route its output to `on_line` until it ends (or the slot dies).

        `request` is the point file's content (plan, database); the experiment folder as the
        process sees it is added here. `on_begin` runs when the slot starts the point.
        """
        if self.ended:
            return PointEnd(None, "the slot had already ended", slot_died=True)
        self.seq += 1
        self.started = False
        doc = {**request, "seq": self.seq, "experiment_id": exp.id, "exp_dir": self.process.stage(exp)}
        safefs.write_atomic(self.dir / "control", slot_point_file(self.seq), json.dumps(doc).encode(), mode=0o644)
        self.begin = f"{SLOT_MARK} begin {self.seq} {exp.id}".encode()

        def begun() -> None:
            on_begin()  # the record says running, with its start time
            from runner.run import tracking_live

            # while the point runs its output folders are the process's (`outputs`): a docker slot's
            # own folder. The end (`lanes._final`) takes the client; the study's lane ends what is left
            tracking_live.begin(exp, outputs=self.process.outputs(exp))

        self.on_begin = begun
        return self.run_rest(on_line)

    def run_rest(self, on_line: Callable[[bytes], None]) -> PointEnd:
        """Read the current point's output up to its end marker (again after an interruption)."""
        end_prefix = f"{SLOT_MARK} end {self.seq} ".encode()
        while True:
            line = self.lines.get()
            if line is None:
                self.ended = True
                code = self.process.wait(timeout=30)
                for kept in self.outside if not self.started else ():
                    on_line(kept)
                return PointEnd(code, f"the study slot's process ended: {self.process.ended_why(code)}", True)
            if not self.started:
                if line == self.begin:
                    self.started = True
                    self.outside.clear()
                    self.on_begin()
                else:
                    self.outside.append(line)
                    log.debug("slot %s: %s", self.name, line.decode("utf-8", "replace"))
                continue
            if line.startswith(end_prefix):
                try:
                    return PointEnd(int(line[len(end_prefix) :].strip()))
                except ValueError:
                    pass  # not a marker of ours: an ordinary line
            on_line(line)

    def request_stop(self, seq: int | None = None) -> None:
        """Ask the slot to stop point `seq` (default: the current one) gracefully."""
        safefs.write_atomic(self.dir / "control", slot_stop_file(seq or self.seq), b"", mode=0o644)

    def unstage(self, exp: Experiment) -> list[str]:
        return self.process.unstage(exp)

    def close(self, timeout: int = 30) -> None:
        """Tell the slot to quit once idle, give it `timeout` seconds, then stop it and remove its folders."""
        if self.process is None:
            return
        try:
            safefs.write_atomic(self.dir / "control", SLOT_QUIT, b"", mode=0o644)
            if self.process.wait(timeout=timeout) is None:
                self.process.terminate(timeout=10)
        finally:
            self._stop_beating.set()
            self.process.close()
            self.process = None
            safefs.remove_tree(self.dir, ignore_errors=True)  # iterative: the points folder is container-made


def slot_name(study_id: str, index: int) -> str:
    return f"{study_id}-{index}-{secrets.token_hex(3)}"


# --- a point's record, read by other processes (`infra status`, `infra stop`) ---------------------------


def reconcile_point(backend, exp: Experiment, record: dict) -> dict:
    """The record of a point a study slot runs, made true.

    While the study runner that owns it is alive, the runner keeps the record; once it is gone, a
    point whose slot process also ended is `lost` (its output folders given back), and one whose
    slot still runs will be stopped by the slot itself (its host's alive file goes stale).
    """
    from runner.run.backends.common import final_lock, harden_outputs, still_this_attempt
    from runner.run.reconcile import pid_alive

    if pid_alive(record.get("runner_pid")):
        return record
    slot = record.get("slot") if isinstance(record.get("slot"), dict) else {}
    if backend.slot_alive(str(slot.get("process", ""))):
        return record
    with final_lock(exp):
        current = exp.read()
        if not still_this_attempt(current, record):
            return current
        name = str(slot.get("name", ""))
        if name and "/" not in name and name not in (".", ".."):
            unstage_outputs(slot_dir(exp.root.parent.parent, name) / "points", exp)
        unchecked = harden_outputs(exp)  # the outputs came back from the slot: checked like any attempt's
        return exp.update(
            state="failed" if unchecked else "lost",
            finished_at=now_iso(),
            message=unchecked
            or "the study runner stopped while this point ran, and its slot ended; "
            "run the study again to resume it from its last checkpoint",
        )


def stop_point(backend, exp: Experiment, record: dict, timeout: int, reason: str) -> dict:
    """`infra stop` of a point: ask its slot to stop it, then wait for the study runner to record the end."""
    slot = record.get("slot") if isinstance(record.get("slot"), dict) else {}
    name, seq = str(slot.get("name", "")), slot.get("seq")
    if not name or "/" in name or not isinstance(seq, int):
        raise EnvironmentProblem(f"experiment {exp.id}: its record names no usable study slot; cannot stop it")
    control = slot_dir(exp.root.parent.parent, name) / "control"
    try:
        safefs.write_atomic(control, slot_stop_file(seq), b"", mode=0o644)
    except FileNotFoundError:
        return reconcile_point(backend, exp, record)
    deadline = time.monotonic() + timeout + STOP_GRACE_S
    while time.monotonic() < deadline:
        current = reconcile_point(backend, exp, exp.read())
        if current.get("state") not in ACTIVE:
            return current
        time.sleep(0.2)
    return exp.read()
