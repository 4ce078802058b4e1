"""Host-side plugin discovery for `infra plugins list|check`: ask the image (or a subprocess), never import.

The host never imports plugin code (DESIGN §2). Discovery runs `python -m runner.core.plugins`
somewhere else and reads its JSON:

- docker backend: a short-lived container of the workdir's plugin image (built when missing, exactly
  the image `infra run` would use), network none, as the invoking uid:gid, removed afterwards. The
  plugins are the copies baked into the image under /workdir.
- local backend: a host subprocess `python -m runner.core.plugins WORKDIR` (needs `.[core]`).

Paths the image reports under /workdir are mapped back to the host workdir, so a broken plugin is
reported as the file the researcher edits. A plugin that fails to load raises `PluginLoadError`
(exit 1) whose message is the core's one line: `plugin FILE:LINE: ErrorType: detail; fix the file
and run again`.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runner import __version__
from runner.errors import EXIT_EXPERIMENT_FAILED, EnvironmentProblem, InfraError, UsageError

log = logging.getLogger(__name__)

CONTAINER_WORKDIR = "/workdir"  # where images/plugins/Dockerfile copies the plugin folders
CORE_PREFIX = "infra plugins: "  # what runner.core.plugins.main puts before a PluginError
DISCOVERY_TIMEOUT_S = 300
LABEL_PURPOSE = "infra.purpose"
_WHERE_RE = re.compile(r"^plugin (?P<file>.+?)(?::(?P<line>\d+))?: (?P<error>\w+): (?P<detail>.*)$")


class PluginLoadError(InfraError):
    """A workdir plugin failed to import or register (exit 1): `file`, `line`, `error` parsed from the message."""

    exit_code = EXIT_EXPERIMENT_FAILED

    def __init__(self, message: str):
        super().__init__(message)
        match = _WHERE_RE.match(message)
        self.file = match["file"] if match else None
        self.line = int(match["line"]) if match and match["line"] else None
        self.error = match["error"] if match else None

    def to_dict(self) -> dict:
        return {"message": self.message, "file": self.file, "line": self.line, "error": self.error}


@dataclass(frozen=True)
class Discovery:
    """What a workdir registers: `components` as `[{kind, name, source_file, builtin}]`, and where it was read."""

    components: list[dict]
    backend: str
    image: str | None = None

    def plugins(self) -> list[dict]:
        return [c for c in self.components if not c["builtin"]]


def map_paths(text: str, workdir: Path) -> str:
    """Replace the image's /workdir/ paths in `text` with the host workdir's (pure)."""
    return re.sub(r"(?<![\w/.-])/workdir/", str(Path(workdir)) + "/", text)


def parse_output(code: int, stdout: str, stderr: str, workdir: Path, where: str) -> list[dict]:
    """Turn the discovery process's exit code and output into components, or raise (pure).

    Exit 1 with the core's `infra plugins:` line → PluginLoadError; any other failure (no core, no
    Python, a crash) → EnvironmentProblem carrying the output's tail.
    """
    if code == 0:
        try:
            rows = json.loads(stdout)
        except ValueError:
            raise EnvironmentProblem(
                f"plugin discovery in {where} printed no JSON list; output tail: {stdout.strip()[-300:]!r}"
            ) from None
        for row in rows:
            row["source_file"] = map_paths(row.get("source_file") or "", workdir)
        return rows
    lines = [line for line in stderr.splitlines() if line.startswith(CORE_PREFIX)]
    if lines:
        raise PluginLoadError(map_paths(lines[-1][len(CORE_PREFIX) :].strip(), workdir))
    tail = "\n".join((stderr or stdout).strip().splitlines()[-15:])
    raise EnvironmentProblem(
        f"plugin discovery in {where} exited with code {code}; is the training core installed there?"
        + (f" Output tail:\n{tail}" if tail else "")
    )


def discover(
    workdir: Path,
    backend: str = "docker",
    client=None,
    on_log: Callable[[str], None] | None = None,
) -> Discovery:
    """Load the workdir's plugins out of process and return what is registered (built-ins included)."""
    workdir = Path(workdir).resolve()
    if backend == "local":
        return Discovery(_discover_local(workdir), "local")
    if backend != "docker":
        raise UsageError(f"--backend {backend!r}: use 'docker' or 'local'")
    return _discover_docker(workdir, client, on_log or (lambda line: None))


def _discover_local(workdir: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "runner.core.plugins", str(workdir)]
    log.debug("discovery: %s", cmd)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=DISCOVERY_TIMEOUT_S, stdin=subprocess.DEVNULL, cwd=str(workdir)
        )
    except subprocess.TimeoutExpired:
        raise EnvironmentProblem(
            f"plugin discovery for {workdir} took over {DISCOVERY_TIMEOUT_S} s; does a plugin block at import?"
        ) from None
    return parse_output(proc.returncode, proc.stdout, proc.stderr, workdir, "a local subprocess")


def _discover_docker(workdir: Path, client, on_log: Callable[[str], None]) -> Discovery:
    from runner import engine
    from runner.images import builds
    from runner.run.launch import decide_image
    from runner.run.spec import training_user
    from runner.settings import node_settings

    settings = node_settings()
    client = client or engine.get_client()
    decision = decide_image(client, workdir, settings, on_log)
    if decision.image_id is None:
        builds.build(client, decision.spec, on_log)
    tag = decision.spec.tag
    uid, gid = training_user(settings)
    container = engine.run_container(
        client,
        tag,
        ["python", "-m", "runner.core.plugins", CONTAINER_WORKDIR],
        labels={LABEL_PURPOSE: "plugin-discovery", builds.LABEL_VERSION: __version__},
        user=f"{uid}:{gid}",
        environment={"HOME": "/tmp/home", "PYTHONUNBUFFERED": "1"},
        network_mode="none",
    )
    try:
        try:
            code = engine.wait(container, timeout=DISCOVERY_TIMEOUT_S)
        except Exception as exc:  # the SDK's read timeout (requests) or an engine error
            raise EnvironmentProblem(f"plugin discovery in image {tag} did not finish: {exc}") from None
        stdout, stderr = _output(container)
    finally:
        engine.remove_container(container)
    return Discovery(parse_output(code, stdout, stderr, workdir, f"image {tag}"), "docker", tag)


def _output(container) -> tuple[str, str]:
    # stdout carries the JSON and stderr the error line: read them apart, not interleaved.
    from runner import engine

    return (engine.container_output(container, stderr=False), engine.container_output(container, stdout=False))


def table(components: list[dict], workdir: Path | None = None) -> str:
    """Aligned `KIND NAME SOURCE` lines, plugins marked; sources under the workdir shown relative."""
    rows = [("KIND", "NAME", "SOURCE")]
    for c in sorted(components, key=lambda c: (c["kind"], c["builtin"], c["name"])):
        source = c["source_file"]
        if workdir is not None and source.startswith(str(workdir) + "/"):
            source = source[len(str(workdir)) + 1 :]
        rows.append((c["kind"], c["name"], "(built-in)" if c["builtin"] else source))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{r[0]:{widths[0]}}  {r[1]:{widths[1]}}  {r[2]}" for r in rows)
