"""Experiment logs: capturing the training's output into `container.log` and reading it back.

Interim version (the bounded-output work replaces it): capture and reads go through runner.safefs.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable

from runner import safefs
from runner.run.records import Experiment

MAX_LINE = 64 << 10


def _lines(chunks, on_line: Callable[[str], None]) -> None:
    partial = bytearray()
    for chunk in chunks:
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                partial += chunk[start:]
                if len(partial) > MAX_LINE:
                    on_line(partial[:MAX_LINE].decode("utf-8", errors="replace") + " [infra: line truncated]")
                    partial = bytearray()
                break
            partial += chunk[start:nl]
            on_line(partial[:MAX_LINE].decode("utf-8", errors="replace").rstrip("\r"))
            partial = bytearray()
            start = nl + 1
    if partial:
        on_line(partial[:MAX_LINE].decode("utf-8", errors="replace").rstrip("\r"))


def _capture(exp: Experiment, chunks, on_line: Callable[[str], None]) -> None:
    fd = safefs.open_truncate(exp.root, exp.container_log.name)
    with os.fdopen(fd, "w", encoding="utf-8") as logf:

        def write(line: str) -> None:
            logf.write(line + "\n")
            logf.flush()
            on_line(line)

        _lines(chunks, write)


def capture_container(exp: Experiment, container, on_line: Callable[[str], None]) -> None:
    """Stream a running container's output into container.log (and `on_line`) until it exits."""
    _capture(exp, container.logs(stream=True, follow=True, stdout=True, stderr=True), on_line)


def save_container_log(exp: Experiment, container) -> None:
    """Replace container.log with the engine's log of a finished container (streamed)."""
    _capture(exp, container.logs(stream=True, follow=False, stdout=True, stderr=True), lambda line: None)


def follow_local(exp: Experiment, done: Callable[[], bool], on_line, on_idle=None, offset: int = 0) -> None:
    """Pass each line of the local backend's growing container.log to `on_line` until `done()`."""
    with safefs.open_read(exp.root, exp.container_log.name) as fh:
        fh.seek(offset)
        while True:
            line = fh.readline(MAX_LINE)
            if line:
                on_line(line.decode("utf-8", errors="replace").rstrip("\n"))
            elif done():
                for rest in iter(lambda: fh.readline(MAX_LINE), b""):
                    on_line(rest.decode("utf-8", errors="replace").rstrip("\n"))
                return
            else:
                if on_idle is not None:
                    on_idle()
                time.sleep(0.1)


def tail_text(exp: Experiment, lines: int) -> str:
    try:
        with safefs.open_read(exp.root, exp.container_log.name) as fh:
            return "\n".join(b.decode("utf-8", errors="replace").rstrip("\n") for b in deque(fh, maxlen=lines))
    except (OSError, safefs.Tampered):
        return ""


def follow_logs(exp: Experiment, on_line, follow: bool = False, tail: int | None = None) -> None:
    """`infra logs`: live from the engine while a container runs, else from container.log."""
    from runner.run.backends import DockerBackend, LocalBackend
    from runner.run.reconcile import reconcile
    from runner.settings import node_settings

    record = reconcile(exp)
    if record.get("backend") == "docker" and record.get("state") == "running":
        backend = DockerBackend(node_settings())
        container = backend.container(exp, record)
        if container is not None:
            _lines(container.logs(stream=True, follow=follow, tail=tail if tail else "all", stdout=True, stderr=True), on_line)
            return
    try:
        with safefs.open_read(exp.root, exp.container_log.name) as fh:
            kept = deque(fh, maxlen=tail) if tail else fh
            for line in kept:
                on_line(line.decode("utf-8", errors="replace").rstrip("\n"))
            offset = fh.tell()
    except FileNotFoundError:
        offset = 0
    if follow and record.get("backend") == "local" and record.get("state") == "running":
        local = LocalBackend(node_settings())
        follow_local(exp, lambda: local.exit_code(exp) is not None, on_line, offset=offset)
