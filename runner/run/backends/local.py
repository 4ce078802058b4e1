"""The local backend: every core job as a host process of this Python (`--backend local`).

Trusted code with the invoker's rights (the workdir's plugins run unconfined): for development,
and for nodes where the core is installed on the host. A job becomes an argv and an environment
(`python -m MODULE ARGS` with each `Place` as its host path); GPUs are chosen with
CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runner import safefs
from runner.errors import EnvironmentProblem
from runner.plan.models import GpuRequest
from runner.run.backends import CoreOutput, CoreTimeout, OnLine, Prepared, SetState
from runner.run.backends.common import after_final, final_lock, local_image_hash, still_this_attempt
from runner.run.jobs import CoreJob, core_environment
from runner.run.records import Experiment, now_iso
from runner.settings import NodeSettings

log = logging.getLogger(__name__)

EXIT_FILE = ".exit_code"  # written by the wrapper (runner.run.local_wrapper) when the core process ends
CORE_MODULES = ("torch", "lightning", "pandas", "pyarrow")
OUTPUT_LIMIT = 16 << 20
STDERR_TAIL_BYTES = 64 << 10


def require_core() -> None:
    """EnvironmentProblem unless this Python has the training core's dependencies."""
    missing = [m for m in CORE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise EnvironmentProblem(
            f"--backend local runs the training core in this Python, which lacks {', '.join(missing)}: "
            "install it with \"pip install 'infra[core]'\" (or use the docker backend)"
        )


class LocalBackend:
    """The training core as a host process: trusted code, the invoker's rights."""

    name = "local"

    def __init__(self, settings: NodeSettings):
        self.settings = settings

    def prepare(self, workdir: Path, gpus: GpuRequest, on_build_log: OnLine) -> Prepared:
        require_core()
        if gpus.requested:
            log.info("local backend: GPUs are used when torch sees them; --gpus only sets CUDA_VISIBLE_DEVICES")
        return Prepared(local_image_hash(workdir))

    def ensure_image(self, prepared: Prepared, on_build_log: OnLine) -> None:
        return None  # no image: the host's own Python

    def dry_prepare(self, workdir: Path) -> dict:
        return {"image_hash": local_image_hash(workdir)}

    def command(self, job: CoreJob) -> list[str]:
        return [sys.executable, *job.argv(inside=False)[1:]]

    def environment(self, job: CoreJob) -> dict[str, str]:
        env = dict(os.environ, **core_environment(job, inside=False))
        visible = job.gpus.cuda_visible_devices()
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        return env

    def describe(self, job: CoreJob) -> dict:
        env = core_environment(job, inside=False)
        visible = job.gpus.cuda_visible_devices()
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        return {"process": {"argv": self.command(job), "environment": env, "user": f"{os.getuid()}:{os.getgid()}"}}

    # --- one attempt of a training ----------------------------------------------------------------

    def start(
        self, exp: Experiment, job: CoreJob, prepared: Prepared, set_state: SetState, on_build_log: OnLine
    ) -> dict:
        set_state("starting", image=None, image_id=None)
        with safefs.open_dir(exp.root) as dfd:
            try:
                os.unlink(EXIT_FILE, dir_fd=dfd)
            except FileNotFoundError:
                pass
        # The wrapper captures the output into the kept log (capped, bounded) and writes the exit file
        # only once the log is complete.
        wrapper = [sys.executable, "-m", "runner.run.local_wrapper", "--log-dir", str(exp.root),
                   str(exp.root / EXIT_FILE), *self.command(job)]  # fmt: skip
        proc = subprocess.Popen(
            wrapper,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=self.environment(job),
            start_new_session=True,
            cwd=str(exp.root),
        )
        return set_state("running", pid=proc.pid, started_at=now_iso())

    def exit_code(self, exp: Experiment) -> int | None:
        try:
            return int(safefs.read_bytes(exp.root, EXIT_FILE, limit=64).decode().strip())
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return None

    def follow(self, exp: Experiment, record: dict, on_log: OnLine) -> dict:
        from runner.run.logs import follow_file_log

        pid = int(record["pid"])

        def reap() -> None:  # our own child must not linger as a zombie
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass

        follow_file_log(exp.root, exp.root / EXIT_FILE, on_log, on_idle=reap, keep_colors=True)
        record = exp.update(log_complete=True)
        return self.finish(exp, record, self.exit_code(exp))

    def stop(self, exp: Experiment, record: dict, timeout: int, reason: str) -> dict:
        if record.get("slot"):
            from runner.run.slots import stop_point

            return stop_point(self, exp, record, timeout, reason)
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

        if record.get("slot"):
            from runner.run.slots import reconcile_point

            return reconcile_point(self, exp, record)
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
        from runner.run.reconcile import finalize

        with final_lock(exp):
            current = exp.read()
            if not still_this_attempt(current, record):
                return current
            record = finalize(exp, current, exit_code, message=message)
        return after_final(exp, record)

    def live_output(
        self, exp: Experiment, record: dict, on_line: OnLine, *, follow: bool, tail: int | None, keep_colors: bool
    ) -> bool:
        from runner.run.logs import follow_file_log

        if not follow or record.get("slot"):
            return False
        follow_file_log(exp.root, exp.root / EXIT_FILE, on_line, tail=tail, keep_colors=keep_colors)
        return True

    # --- other core jobs ----------------------------------------------------------------------------

    def experiment_image(self, record: dict) -> tuple[None, None]:
        return None, None  # the host's own core runs any experiment's model

    def predicts_members_together(self, image: tuple[str | None, str | None]) -> bool:
        return True  # the host's own core

    def run_once(self, job: CoreJob) -> CoreOutput:
        require_core()
        # Files, not pipes: what is kept of either stream stays bounded however much the core prints.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                self.command(job),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=self.environment(job),
                cwd=str(job.workdir),
                start_new_session=True,
            )
            try:
                code = proc.wait(timeout=job.timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise CoreTimeout(f"did not finish within {job.timeout_s} s") from None
            except BaseException:  # Ctrl-C: the core goes with this process
                _kill_group(proc)
                raise
            out.seek(0)
            stdout = out.read(OUTPUT_LIMIT)
            err.seek(max(0, os.fstat(err.fileno()).st_size - STDERR_TAIL_BYTES))
            stderr = err.read().decode("utf-8", "replace")
        return CoreOutput(code, stdout, stderr)

    def open_slot(self, job: CoreJob):
        from runner.run.backends.local_slot import LocalSlot

        require_core()
        return LocalSlot.start(self, job)

    def slot_alive(self, ident: str) -> bool:
        from runner.run.reconcile import is_our_process, pid_alive

        return ident.isdigit() and pid_alive(ident) and is_our_process(ident, "runner.core.slot")

    def engine_info(self) -> dict:
        return {"reachable": None, "note": "local backend"}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
