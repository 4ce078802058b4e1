"""Running `infra`: as a user does (`infra`, a real subprocess), or inside the test's process (`cli`).

Both give a `subprocess.CompletedProcess` with the exit code, stdout and stderr. `cli` is for tests of
the command line's own behaviour (arguments, messages, exit codes, JSON documents, files read and
written): the same result without the ~0.4 s of a Python start. A test that needs a process (signals,
`--detach`, several processes at once, another user, SSH, the queue worker, a training) uses `infra`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
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


def cli(
    *args: str,
    workdir: Path | None = None,
    cwd: Path | None = None,
    env: dict | None = None,
    input: str | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Run `infra ARGS` in this process, with what `infra(ARGS, ...)` would give its child process.

    Same arguments and result as `infra`: for the call, the environment is exactly
    `infra_env(workdir, env)` (plus what importing the CLI sets, as in every `infra` process), the
    working directory is the same, stdin holds `input` (else nothing), stdout and stderr are pipes
    decoded the way `subprocess.run(text=True)` decodes them, the logging root has no handlers and the
    warning filters are Python's defaults (warnings print to stderr). The exit code is that of
    `runner.cli.main`'s SystemExit; an uncaught exception exits 1 with its traceback on stderr, as in
    Python. Everything is restored afterwards. `timeout` is not enforced in-process, and the call swaps
    process-wide state: never from two threads at once.

    INFRA_TEST_CLI=subprocess makes every call run `infra` instead (to check that the two agree).
    """
    if os.environ.get("INFRA_TEST_CLI") == "subprocess":
        return infra(*args, workdir=workdir, cwd=cwd, env=env, input=input, timeout=timeout)
    environ = {**_CLI_IMPORT_ENV, **infra_env(workdir, env)}
    with _as_a_process(environ, cwd or workdir or REPO, input or "") as (out, err):
        from runner.cli import main

        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = _exit_status(exc.code)
        except BaseException:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess([*INFRA, *args], code, _read_pipe(out), _read_pipe(err))


def _cli_import_env() -> dict[str, str]:
    """What importing `runner.cli` adds to the environment (its os.environ.setdefault calls): every
    `infra` process gets it at start, so every in-process call gets it too."""
    if "runner.cli" in sys.modules:
        raise RuntimeError("tests.helpers must be imported before runner.cli to see what the import sets")
    before = dict(os.environ)
    import runner.cli  # noqa: F401

    added = {k: v for k, v in os.environ.items() if before.get(k) != v}
    os.environ.clear()
    os.environ.update(before)
    return added


def _exit_status(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("text"): Python prints it and exits 1
    return 1


def _pipe(stream, errors: str) -> io.TextIOWrapper:
    """A text stream like the child's end of a pipe: not a terminal, no file descriptor."""
    return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors=getattr(stream, "errors", None) or errors)


def _read_pipe(stream: io.TextIOWrapper) -> str:
    stream.flush()
    # subprocess.run(text=True): decode, then universal newlines
    return stream.buffer.getvalue().decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


@contextlib.contextmanager
def _as_a_process(environ: dict, cwd: Path, stdin_text: str):
    out, err = _pipe(sys.__stdout__, "strict"), _pipe(sys.__stderr__, "backslashreplace")
    stdin = io.TextIOWrapper(io.BytesIO(stdin_text.encode("utf-8")), encoding="utf-8")
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    streams = ("stdin", "stdout", "stderr", "__stdin__", "__stdout__", "__stderr__")
    saved_streams = {name: getattr(sys, name) for name in streams}
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        # the dunder streams too: shutil.get_terminal_size (click's help width) asks sys.__stdout__
        for name in streams:
            setattr(sys, name, {"stdin": stdin, "stdout": out, "stderr": err}[name.strip("_")])
        root.handlers.clear()  # the CLI's logging.basicConfig then installs its handler, as in a new process
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for action, category in _DEFAULT_WARNING_FILTERS:
                warnings.simplefilter(action, category, append=True)
            warnings.showwarning = _warning_to_stderr
            yield out, err
    finally:
        for handler in root.handlers:
            if handler not in saved_handlers:
                handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, stream in saved_streams.items():
            setattr(sys, name, stream)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


# Python's default warning filters (a fresh interpreter without -W or PYTHONWARNINGS).
_DEFAULT_WARNING_FILTERS = [
    ("ignore", DeprecationWarning),
    ("ignore", PendingDeprecationWarning),
    ("ignore", ImportWarning),
    ("ignore", ResourceWarning),
]


def _warning_to_stderr(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


_CLI_IMPORT_ENV = _cli_import_env()


# A process started while SIGINT is ignored keeps ignoring it (POSIX: `cmd &` in a script, `nohup`), and
# Python then installs no KeyboardInterrupt handler: a suite launched in the background would see every
# Ctrl-C test hang until its timeout. Tests that interrupt what they start run it through this.
DEFAULT_SIGINT = ("env", "--default-signal=INT")


def infra_background(*args: str, workdir: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start `infra ARGS` in its own session (so a test can signal its whole process group).

    stdout and stderr go to `log`.
    """
    with open(log, "w") as fh:
        return subprocess.Popen(
            [*DEFAULT_SIGINT, *INFRA, *args],
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


def gate_workdir(dest: Path) -> Path:
    """A workdir from the template at `dest` with the demo database (BLAT, 4,997 variants) as data/blat.db
    and the gate model (tests/gate_model.py) as a plugin."""
    from runner.data.importer import build_demo_db

    shutil.copytree(REPO / "plugins_template", dest)
    shutil.copy(REPO / "tests" / "gate_model.py", dest / "model" / "gate.py")
    build_demo_db(dest / "data" / "blat.db")
    return dest
