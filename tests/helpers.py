"""Running `infra` the way a user does: a real subprocess, its exit code, stdout and stderr."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
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


# Linux records the pre-exec memory's high-water mark in the exec'd process's ru_maxrss, so a process
# started straight from pytest (hundreds of MB after the docker tests) would report pytest's size.
# A tiny launcher spawns the measured command and reports its wait4 usage instead.
RSS_PROBE = (
    "import json, os, sys\n"
    "pid = os.posix_spawn(sys.argv[4], sys.argv[4:], os.environ, file_actions=[\n"
    "    (os.POSIX_SPAWN_OPEN, 1, sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),\n"
    "    (os.POSIX_SPAWN_OPEN, 2, sys.argv[3], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "with open(sys.argv[1], 'w') as fh:\n"
    "    json.dump([os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024], fh)\n"
)


def spawn_measured(cmd: list[str], env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    files = Path(tempfile.mkdtemp(prefix="infra-rss-"))
    probe = subprocess.Popen(
        [sys.executable, "-S", "-c", RSS_PROBE, *(str(files / n) for n in ("rss", "out", "err")), *cmd],
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )
    return probe, files


def collect(probe: subprocess.Popen, files: Path, timeout: int = 1800) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, peak RSS in MB) of the command the probe ran."""
    assert probe.wait(timeout) == 0
    code, rss = json.loads((files / "rss").read_text())
    out, err = ((files / n).read_text() for n in ("out", "err"))
    shutil.rmtree(files, ignore_errors=True)
    return code, out, err, rss


def measured(cmd: list[str], env: dict | None = None) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, peak RSS in MB) of one process."""
    return collect(*spawn_measured(cmd, env))
