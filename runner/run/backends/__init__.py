"""Where the training core runs: one interface (`Backend`), one registry line per implementation.

Every run of the core goes through a backend object: trainings (`start`, `follow`, `stop`,
`reconcile`), one-shot runs (`run_once`: `infra predict`, plugin discovery), study slots
(`open_slot`: one long-lived core process that runs many experiments), what `--dry-run` prints
(`describe`) and `infra logs` (`live_output`). What the core is asked to do is a typed
`runner.run.jobs.CoreJob`; a backend decides only how to start it (a container, a host process).

`backend_for(name)` is the one place a backend name is looked at; `BackendName` is the typer choice
of `--backend`. Adding a backend is one class implementing `Backend` and one line in `BACKENDS`
(docs/architecture.md walks through it).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from runner.errors import UsageError

if TYPE_CHECKING:  # the CLI imports this module for `--backend`'s choices: kept light
    from runner.plan.models import GpuRequest
    from runner.run.jobs import CoreJob
    from runner.run.records import Experiment
    from runner.settings import NodeSettings

OnLine = Callable[[str], None]
SetState = Callable[..., dict]


@dataclass(frozen=True)
class Prepared:
    """What `prepare` found before the experiment exists: the content hash its id uses, and (docker)
    the image — `image_id` None with a tag means it is built by `start`, from `build`."""

    image_hash: str
    image_tag: str | None = None
    image_id: str | None = None
    build: object | None = None  # the plugin BuildSpec when it must be built


@dataclass(frozen=True)
class CoreOutput:
    """What a one-shot core run left: its exit code, its stdout (capped) and the tail of its stderr."""

    exit_code: int
    stdout: bytes
    stderr: str


class CoreTimeout(Exception):
    """A one-shot core run took longer than its job's `timeout_s` (it was killed and removed)."""


class SlotProcess(Protocol):
    """A long-lived core process serving a study slot (`runner.run.slots`): a container or a host process."""

    ident: str  # the container id or the process id, for records and `infra status`
    container_id: str | None  # the container's id (None for a host process)

    def chunks(self) -> Iterator[bytes]:
        """The process's output (stdout and stderr in order) until it ends."""

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit code once it ended (None if still running after `timeout`)."""

    def ended_why(self, exit_code: int | None) -> str:
        """Why the process ended, in words (out of memory, killed by a signal, its exit code)."""

    def terminate(self, timeout: int) -> None:
        """SIGTERM (the current point checkpoints), then SIGKILL after `timeout` seconds."""

    def close(self) -> None:
        """Forget the process: remove its container, reap it. Safe to call twice."""

    def path(self, place) -> str:
        """Where the process sees a `runner.run.jobs.Place` of its job."""

    def stage(self, exp: Experiment) -> str:
        """Make the experiment's output folders visible to the process; the exp dir as the core names it."""

    def outputs(self, exp: Experiment) -> Path:
        """Where the experiment's output folders are on the host while the process runs it."""

    def unstage(self, exp: Experiment) -> list[str]:
        """Give the output folders back to the experiment directory (after the point, or a crash);
        the folders that came back tampered (replaced by empty ones)."""


class Backend(Protocol):
    """Runs core jobs somewhere (see the module docstring)."""

    name: str
    settings: NodeSettings

    def prepare(self, workdir: Path, gpus: GpuRequest, on_build_log: OnLine) -> Prepared:
        """Pre-flight before the experiment exists: the image decision (docker), the core present (local)."""

    def ensure_image(self, prepared: Prepared, on_build_log: OnLine) -> str | None:
        """The image id jobs of `prepared` run in, built first when missing (None: no image)."""

    def dry_prepare(self, workdir: Path) -> dict:
        """What `prepare` would find, building nothing (for `--dry-run`); always has `image_hash` (None
        when it cannot be known yet, e.g. before the base image exists)."""

    def describe(self, job: CoreJob) -> dict:
        """What would be started for `job` (the container spec, or the argv and environment)."""

    def start(
        self, exp: Experiment, job: CoreJob, prepared: Prepared, set_state: SetState, on_build_log: OnLine
    ) -> dict:
        """Start the experiment's training detached from this process; the record once it runs."""

    def follow(self, exp: Experiment, record: dict, on_log: OnLine) -> dict:
        """Stream the training's output until it ends; the final record."""

    def stop(self, exp: Experiment, record: dict, timeout: int, reason: str) -> dict:
        """Graceful stop (SIGTERM, SIGKILL after `timeout`); the final record."""

    def reconcile(self, exp: Experiment, record: dict) -> dict:
        """The active record made true against the engine or the process."""

    def live_output(
        self, exp: Experiment, record: dict, on_line: OnLine, *, follow: bool, tail: int | None, keep_colors: bool
    ) -> bool:
        """`infra logs` of a running training from its live source (lines made terminal-safe); False when
        there is none and the kept log is the source."""

    def experiment_image(self, record: dict) -> tuple[str | None, str | None]:
        """(tag, id) of the image an experiment ran in, checked against the engine (None, None: no image)."""

    def predicts_members_together(self, image: tuple[str | None, str | None]) -> bool:
        """Whether the core that runs in `image` (what `experiment_image` gave) predicts several experiments
        in one run (`runner.core.predict --member`); an experiment's older image may not."""

    def run_once(self, job: CoreJob) -> CoreOutput:
        """Run a short core job to its end (prediction, discovery); CoreTimeout past `job.timeout_s`."""

    def open_slot(self, job: CoreJob) -> SlotProcess:
        """Start a study slot's long-lived core process."""

    def slot_alive(self, ident: str) -> bool:
        """Whether the slot process `ident` (a container id, a pid) still runs (True when it cannot be told)."""

    def engine_info(self) -> dict:
        """What a worker's heartbeat says about this backend's engine."""


# name → "module:class", imported on first use (reading a local record never loads the Docker SDK)
BACKENDS = {
    "docker": "runner.run.backends.docker:DockerBackend",
    "local": "runner.run.backends.local:LocalBackend",
}

BackendName = enum.StrEnum("BackendName", {name: name for name in BACKENDS})
BackendName.__doc__ = "`--backend`: typer's choice of the registered backends."


def backend_for(name: str | BackendName, settings: NodeSettings | None = None, **kwargs) -> Backend:
    """The backend called `name`; a UsageError names the choices."""
    import importlib

    from runner.settings import node_settings

    target = BACKENDS.get(str(name))
    if target is None:
        raise UsageError(f"--backend {str(name)[:40]!r}: use one of {', '.join(BACKENDS)}")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)(settings or node_settings(), **kwargs)


def backend_of(record: dict, cache: dict[str, Backend] | None = None) -> Backend:
    """The backend that ran a record (one object per name when `cache` is given: one engine client)."""
    from runner.run.records import RecordError

    name = str(record.get("backend"))
    if cache is not None and name in cache:
        return cache[name]
    if name not in BACKENDS:
        raise RecordError(
            f"experiment {str(record.get('experiment_id'))[:80]!r}: its record names no known backend ({name[:40]!r})"
        )
    backend = backend_for(name)
    if cache is not None:
        cache[name] = backend
    return backend
