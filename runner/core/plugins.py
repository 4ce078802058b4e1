"""Workdir plugins: every `.py` in `model/`, `embed/`, `metrics/`, `vocab/` imported as `infra_ext.<kind>.<module>`.

Importing a plugin runs its `register_*` calls, which is how it becomes available to plans. A
plugin that fails to import raises `PluginError` naming the file and the line (the SyntaxError's
line, or the deepest traceback frame inside the plugin file).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import logging
import math
import os
import sys
import traceback
import types
from pathlib import Path

from runner.errors import InfraError

log = logging.getLogger(__name__)

PLUGIN_KINDS = ("vocab", "embed", "model", "metrics")  # vocab first: the others may use it
NAMESPACE = "infra_ext"
CONTAINER_WORKDIR = "/workdir"


class PluginError(InfraError):
    """A workdir plugin could not be imported: user code failed (exit 1, like any failing user code)."""

    exit_code = 1


def resolve_workdir(explicit: str | Path | None = None) -> Path | None:
    """`--workdir`, else env INFRA_WORKDIR, else /workdir when it exists (inside the container), else None."""
    for candidate in (explicit, os.environ.get("INFRA_WORKDIR")):
        if candidate:
            return Path(candidate)
    return Path(CONTAINER_WORKDIR) if Path(CONTAINER_WORKDIR).is_dir() else None


def _namespace(name: str, path: Path | None) -> types.ModuleType:
    module = sys.modules.get(name)
    if module is None:
        module = types.ModuleType(name)
        module.__path__ = []  # a package, so submodules can be imported under it
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    if path is not None and str(path) not in module.__path__:
        module.__path__.append(str(path))
    return module


def _error_line(exc: BaseException, file: Path) -> int | None:
    if isinstance(exc, SyntaxError) and exc.filename and Path(exc.filename).resolve() == file.resolve():
        return exc.lineno
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename).resolve() == file.resolve():
            line = frame.lineno  # deepest frame in the plugin file
    return line


def _import(kind: str, file: Path) -> types.ModuleType:
    name = f"{NAMESPACE}.{kind}.{file.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        line = _error_line(exc, file)
        where = f"{file}:{line}" if line else str(file)
        detail = exc.msg if isinstance(exc, SyntaxError) else str(exc)
        raise PluginError(f"plugin {where}: {type(exc).__name__}: {detail}; fix the file and run again") from exc
    setattr(sys.modules[f"{NAMESPACE}.{kind}"], file.stem, module)
    return module


def load_plugins(workdir: str | Path | None) -> list[types.ModuleType]:
    """Import every plugin file of `workdir` (sorted, vocab → embed → model → metrics); return the modules.

    Files starting with `_` or `.` are skipped. Importing the same workdir twice is a no-op.
    """
    if workdir is None:
        return []
    root = Path(workdir)
    import runner.core.builtins  # noqa: F401  built-ins first, so a plugin reusing a name is reported

    _namespace(NAMESPACE, None)
    loaded = []
    for kind in PLUGIN_KINDS:
        folder = root / kind
        if not folder.is_dir():
            continue
        _namespace(f"{NAMESPACE}.{kind}", folder)
        for file in sorted(folder.glob("*.py")):
            if file.name.startswith(("_", ".")):
                continue
            loaded.append(_import(kind, file))
            log.info("loaded plugin %s", file)
    return loaded


# What the runner itself passes to each kind's factory: not plan parameters.
RUNNER_ARGS = {
    "model": ("seq_len", "in_dim", "n_outputs"),
    "embedding": ("vocab",),
    "metric": ("y_true", "y_pred"),
    "split": ("variants", "spec"),  # a split's settings are the plan's split.* keys
    "vocab": (),
}
MAX_SHOWN = 200


def describe_params(kind: str, factory) -> list[dict]:
    """The plan parameters a factory takes: `{"name", "type", "default", "required"}` each (the
    arguments the runner passes and `*args`/`**kwargs` left out; a type or default that is not
    plain JSON shown as bounded text)."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return []
    out = []
    for p in sig.parameters.values():
        if p.name in RUNNER_ARGS.get(kind, ()) or p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        annotation = None if p.annotation is p.empty else p.annotation
        if annotation is not None and not isinstance(annotation, str):
            annotation = getattr(annotation, "__name__", None) or str(annotation)
        default = None if p.default is p.empty else p.default
        if not (default is None or isinstance(default, bool | int | str) or _finite_float(default)):
            default = repr(default)
        if isinstance(default, str):
            default = default[:MAX_SHOWN]
        out.append(
            {
                "name": p.name,
                "type": annotation[:MAX_SHOWN] if annotation else None,
                "default": default,
                "required": p.default is p.empty,
            }
        )
    return out


def _takes_any_keyword(factory) -> bool:
    """Whether the factory takes **kwargs (any parameter name is accepted)."""
    try:
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return True


def _finite_float(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def describe_registries() -> list[dict]:
    """Every registered component: `{"kind", "name", "source_file", "builtin", "params"}` (for
    `infra plugins list`); `params` as `describe_params`."""
    from runner.core.builtins import registries

    rows = []
    for kind, registry in registries().items():
        for entry in registry.entries():
            module = getattr(entry.factory, "__module__", "") or ""
            rows.append(
                {
                    "kind": kind,
                    "name": entry.name,
                    "source_file": entry.source_file,
                    "builtin": not module.startswith(NAMESPACE),
                    "params": describe_params(kind, entry.factory),
                    "open_params": _takes_any_keyword(entry.factory),
                }
            )
    return rows


def private_stdout() -> int:
    """Keep the process's real stdout for the discovery document and point fd 1 (and sys.stdout) at
    stderr, so whatever plugin code prints, in Python or with os.write(1, …), cannot mix into it.

    Returns the new, non-inheritable descriptor of the real stdout.
    """
    sys.stdout.flush()
    channel = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return channel


def main(argv: list[str] | None = None) -> int:
    """`python -m runner.core.plugins [WORKDIR]`: load the plugins, write `describe_registries()` as JSON.

    Exit 0 with the JSON list as the only thing on stdout, or 1 with the one-line PluginError on
    stderr. What plugin code prints goes to stderr (`private_stdout`). What `infra plugins list` runs
    in the image; the host treats the document as untrusted all the same.
    """
    import json

    args = sys.argv[1:] if argv is None else argv
    channel = private_stdout()
    try:
        load_plugins(resolve_workdir(args[0] if args else None))
        document = json.dumps(describe_registries(), indent=2)
    except PluginError as exc:
        print(f"infra plugins: {exc}", file=sys.stderr)
        os.close(channel)
        return exc.exit_code
    with os.fdopen(channel, "w", encoding="utf-8") as out:
        out.write(document + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
