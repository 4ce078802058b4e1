"""Options and arguments several commands share, and the one way each is turned into its typed value."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from runner.run.backends import BackendName

JSON_OPT = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
WORKDIR_OPT = Annotated[
    Path | None, typer.Option("--workdir", help="Workdir to use (default: INFRA_WORKDIR, then 'infra workdir set').")
]
BACKEND_OPT = Annotated[
    BackendName,
    typer.Option(
        "--backend",
        help="Where the training core runs: docker (a hardened container of the plugin image) or local "
        "(a host process of this Python; trusted code, needs '.[core]').",
        case_sensitive=False,
    ),
]
GPUS_OPT = Annotated[
    str | None,
    typer.Option("--gpus", help='GPUs: "all", a count, a device list "0,2", or "none" (overrides resources.gpus).'),
]


def resolve_workdir(flag: Path | None) -> Path:
    """`--workdir` when given (it must exist), else the node's workdir (INFRA_WORKDIR, then the setting)."""
    from runner.errors import WorkdirError
    from runner.workdir.store import get_workdir

    if flag is not None:
        if not flag.is_dir():
            raise WorkdirError(f"--workdir {flag} is not a directory; create it or use 'infra init {flag}'")
        return flag.resolve()
    return get_workdir(required=True)


def backend(name: BackendName | str):
    """The backend object a command runs the core on (`--backend`)."""
    from runner.run.backends import backend_for

    return backend_for(name)


def gpus(flag: str | None):
    """`--gpus` parsed once into a `GpuRequest` (None: the plan's resources.gpus decide)."""
    from runner.plan.models import GpuRequest

    return None if flag is None else GpuRequest.parse(flag, "--gpus")
