"""A study slot as a host process (`runner.run.slots`, `--backend local`): it works on the experiment
directories in place (trusted code, the invoker's rights)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from runner.run.jobs import CoreJob, Place
from runner.run.records import Experiment
from runner.run.slots import describe_exit

READ_SIZE = 1 << 20


class LocalSlot:
    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.ident = str(proc.pid)
        self.container_id = None

    @classmethod
    def start(cls, backend, job: CoreJob) -> LocalSlot:
        proc = subprocess.Popen(
            backend.command(job),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=backend.environment(job),
            cwd=str(job.workdir),
            start_new_session=True,
        )
        return cls(proc)

    def path(self, place: Place) -> str:
        return str(place.host)

    def chunks(self):
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, READ_SIZE):
            yield chunk

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return 128 - code if code < 0 else code  # killed by a signal: as a shell (and Docker) reports it

    def ended_why(self, exit_code: int | None) -> str:
        return describe_exit(exit_code)

    def terminate(self, timeout: int) -> None:
        self._signal(signal.SIGTERM)
        if self.wait(timeout) is None:
            self._signal(signal.SIGKILL)
            self.proc.wait()

    def _signal(self, signum: int) -> None:
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        if self.proc.poll() is None:
            self.terminate(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stage(self, exp: Experiment) -> str:
        return str(exp.root)

    def outputs(self, exp: Experiment) -> Path:
        return exp.root

    def unstage(self, exp: Experiment) -> list[str]:
        return []
