"""Host-side plugin discovery for `infra plugins list|check`: ask the image (or a subprocess), never import.

The host never imports plugin code (DESIGN §2). Discovery runs `python -m runner.core.plugins`
somewhere else and reads its JSON:

- docker backend: a short-lived container of the workdir's plugin image (built when missing, exactly
  the image `infra run` would use), hardened like a training (`runner.run.hardening`: never uid 0,
  no capabilities, no-new-privileges, a pids limit), network none, read-only root with a /tmp
  tmpfs, its log capped, removed afterwards. The plugins are the copies baked into the image.
- local backend: a host subprocess `python -m runner.core.plugins WORKDIR` (needs `.[core]`).

The document travels on the process's real stdout, which the core keeps to itself: plugin output,
`print` or `os.write(1, …)`, goes to stderr. It is still untrusted: at most `MAX_DOCUMENT_BYTES`, a
JSON list of `{kind, name, source_file, builtin}` with strings free of control characters, or a
`DiscoveryOutputError` (exit 1) naming the workdir.

Paths the image reports under /workdir are mapped back to the host workdir, so a broken plugin is
reported as the file the researcher edits. A plugin that fails to load raises `PluginLoadError`
(exit 1) whose message is the core's one line: `plugin FILE:LINE: ErrorType: detail; fix the file
and run again`.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from runner.errors import EXIT_EXPERIMENT_FAILED, EnvironmentProblem, InfraError
from runner.images.context import shown
from runner.plan.models import GpuRequest
from runner.run.jobs import core_error

log = logging.getLogger(__name__)

DISCOVERY_TIMEOUT_S = 300
MAX_DOCUMENT_BYTES = 8 << 20  # the template's document is about 3 KB
MAX_COMPONENTS = 10_000
STDERR_TAIL_BYTES = 64 << 10
ROW_KEYS = {"kind": 100, "name": 200, "source_file": 4096}  # string fields and their longest values
PARAM_KEYS = {"name", "type", "default", "required"}
MAX_PARAMS = 200  # per component
PARAM_TEXT = 200  # longest name, type or text default
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
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


class DiscoveryOutputError(PluginLoadError):
    """Discovery exited 0 but its document is unusable (exit 1, like failing plugin code): what ran
    there, plugin code included, wrote to the channel or broke the process before it could answer."""

    def __init__(self, workdir: Path, where: str, why: str):
        super().__init__(
            f"plugin discovery for workdir {shown(workdir)} in {where} returned a malformed document ({why}); "
            f"a plugin may write to the discovery channel or end the process: run 'infra plugins check "
            f"--backend local --workdir {shown(workdir)}' and read what the plugins print"
        )
        self.error = "DiscoveryOutputError"


def check_document(data: bytes | str, workdir: Path, where: str) -> list[dict]:
    """The discovery document as components, checked like any untrusted input (pure): size, JSON,
    a list of rows with exactly `kind`, `name`, `source_file` (bounded strings without control
    characters) and a boolean `builtin`. Raises DiscoveryOutputError saying what is wrong."""
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise DiscoveryOutputError(workdir, where, f"more than {MAX_DOCUMENT_BYTES} bytes")
    if not raw.strip():
        raise DiscoveryOutputError(workdir, where, "empty")
    try:
        rows = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise DiscoveryOutputError(workdir, where, "not JSON: not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DiscoveryOutputError(workdir, where, f"not JSON: {exc.msg} at byte {exc.pos}") from None
    if not isinstance(rows, list):
        raise DiscoveryOutputError(workdir, where, f"a JSON {type(rows).__name__}, not a list")
    if len(rows) > MAX_COMPONENTS:
        raise DiscoveryOutputError(workdir, where, f"{len(rows)} components, more than {MAX_COMPONENTS}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) != {*ROW_KEYS, "builtin", "params", "open_params"}:
            raise DiscoveryOutputError(
                workdir, where, f"item {i} is not an object of kind, name, source_file, builtin, params, open_params"
            )
        for key, longest in ROW_KEYS.items():
            value = row[key]
            if not isinstance(value, str) or len(value) > longest or _CONTROL.search(value):
                raise DiscoveryOutputError(
                    workdir, where, f"item {i}: {key} is not a string of at most {longest} printable characters"
                )
        if not isinstance(row["builtin"], bool) or not isinstance(row["open_params"], bool):
            raise DiscoveryOutputError(workdir, where, f"item {i}: builtin or open_params is not true or false")
        why = _params_problem(row["params"])
        if why:
            raise DiscoveryOutputError(workdir, where, f"item {i}: params {why}")
    return rows


def _text(value, allow_none: bool = False) -> bool:
    if value is None:
        return allow_none
    return isinstance(value, str) and len(value) <= PARAM_TEXT and not _CONTROL.search(value)


def _params_problem(params) -> str | None:
    """What is wrong with a component's `params` list (pure), None when it is well-formed."""
    if not isinstance(params, list) or len(params) > MAX_PARAMS:
        return f"is not a list of at most {MAX_PARAMS} parameters"
    for j, param in enumerate(params):
        if not isinstance(param, dict) or set(param) != PARAM_KEYS:
            return f"item {j} is not an object of name, type, default, required"
        default = param["default"]
        plain = isinstance(default, bool | int | float) or _text(default, allow_none=True)
        if not (_text(param["name"]) and _text(param["type"], allow_none=True) and plain):
            return f"item {j} has a name, type or default that is not short printable text or a number"
        if not isinstance(param["required"], bool):
            return f"item {j}: required is not true or false"
    return None


@dataclass(frozen=True)
class Discovery:
    """What a workdir registers: `components` as `[{kind, name, source_file, builtin, params}]`, and where it was read."""

    components: list[dict]
    backend: str
    image: str | None = None

    def plugins(self) -> list[dict]:
        return [c for c in self.components if not c["builtin"]]


def map_paths(text: str, workdir: Path) -> str:
    """Replace the image's /workdir/ paths in `text` with the host workdir's (pure)."""
    return re.sub(r"(?<![\w/.-])/workdir/", str(Path(workdir)) + "/", text)


def parse_output(code: int, stdout: bytes | str, stderr: str, workdir: Path, where: str) -> list[dict]:
    """Turn the discovery process's exit code and output into components, or raise (pure).

    Exit 0 → the checked document (`check_document`; DiscoveryOutputError when malformed); exit 1
    with the core's `infra plugins:` line → PluginLoadError; any other failure (no core, no Python,
    a crash) → EnvironmentProblem carrying the output's tail.
    """
    if code == 0:
        rows = check_document(stdout, workdir, where)
        for row in rows:
            row["source_file"] = map_paths(row["source_file"], workdir)
        return rows
    reason = core_error("plugins", stderr)
    if reason:
        raise PluginLoadError(map_paths(reason, workdir))
    tail = "\n".join((stderr or stdout).strip().splitlines()[-15:])
    raise EnvironmentProblem(
        f"plugin discovery in {where} exited with code {code}; is the training core installed there?"
        + (f" Output tail:\n{tail}" if tail else "")
    )


def discover(workdir: Path, backend, on_log: Callable[[str], None] | None = None) -> Discovery:
    """Load the workdir's plugins out of process, on `backend`, and return what is registered (built-ins
    included). The docker backend builds the plugin image first when it is missing (the image
    `infra run` would use)."""
    from runner.run.backends import CoreTimeout
    from runner.run.jobs import discovery_job
    from runner.run.spec import LABEL_PURPOSE

    workdir = Path(workdir).resolve()
    on_log = on_log or (lambda line: None)
    prepared = backend.prepare(workdir, GpuRequest(), on_log)
    image_id = backend.ensure_image(prepared, on_log)
    job = discovery_job(
        workdir, {LABEL_PURPOSE: "plugin-discovery"}, f"infra-plugins-{secrets.token_hex(4)}", DISCOVERY_TIMEOUT_S
    ).with_image(prepared.image_tag, image_id)
    job = replace(job, log_limit=2 * MAX_DOCUMENT_BYTES)  # the engine keeps little: the document comes last
    where = f"image {prepared.image_tag}" if prepared.image_tag else "a local subprocess"
    try:
        output = backend.run_once(job)
    except CoreTimeout as exc:
        raise EnvironmentProblem(
            f"plugin discovery for {shown(workdir)} in {where} {exc}; does a plugin block at import?"
        ) from None
    components = parse_output(output.exit_code, output.stdout, output.stderr, workdir, where)
    return Discovery(components, backend.name, prepared.image_tag)


def params_text(params: list[dict]) -> str:
    """`hidden: int = 64, base: str = 'ridge', alpha: float (required)` (pure)."""
    parts = []
    for p in params:
        text = p["name"] + (f": {p['type']}" if p["type"] else "")
        text += " (required)" if p["required"] else f" = {p['default']!r}"
        parts.append(text)
    return ", ".join(parts) or "-"


def table(components: list[dict], workdir: Path | None = None) -> str:
    """Aligned `KIND NAME SOURCE PARAMETERS` lines, plugins marked; sources under the workdir shown relative."""
    rows = [("KIND", "NAME", "SOURCE", "PARAMETERS")]
    for c in sorted(components, key=lambda c: (c["kind"], c["builtin"], c["name"])):
        source = c["source_file"]
        if workdir is not None and source.startswith(str(workdir) + "/"):
            source = source[len(str(workdir)) + 1 :]
        rows.append((c["kind"], c["name"], "(built-in)" if c["builtin"] else source, params_text(c["params"])))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:{widths[0]}}  {r[1]:{widths[1]}}  {r[2]:{widths[2]}}  {r[3]}".rstrip() for r in rows)
