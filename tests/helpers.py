"""Running `infra` the way a user does: a real subprocess, its exit code, stdout and stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INFRA = [sys.executable, "-m", "runner"]


def infra_env(workdir: Path | None = None, env: dict | None = None) -> dict:
    """The test's environment for an `infra` process: no inherited workdir unless `workdir` is given."""
    full = {k: v for k, v in os.environ.items() if k != "INFRA_WORKDIR"}
    full["PYTHONUNBUFFERED"] = "1"
    if workdir is not None:
        full["INFRA_WORKDIR"] = str(workdir)
    full.update(env or {})
    return full


def infra(
    *args: str,
    workdir: Path | None = None,
    cwd: Path | None = None,
    env: dict | None = None,
    input: str | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Run `infra ARGS` to completion and capture its output as text.

    With `workdir`, INFRA_WORKDIR points at it and it is the working directory (unless `cwd` is
    given); otherwise the command runs in the repository. `env` entries are added last.
    """
    return subprocess.run(
        [*INFRA, *args],
        input=input,
        capture_output=True,
        text=True,
        env=infra_env(workdir, env),
        cwd=cwd or workdir or REPO,
        timeout=timeout,
    )


def infra_background(*args: str, workdir: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start `infra ARGS` in its own session (so a test can signal its whole process group).

    stdout and stderr go to `log`.
    """
    with open(log, "w") as fh:
        return subprocess.Popen(
            [*INFRA, *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=infra_env(workdir, env),
            cwd=workdir,
            start_new_session=True,
        )
