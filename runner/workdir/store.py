"""The node's workdir setting: where plugins, plans and `experiments/` live.

Precedence, read at call time: the `INFRA_WORKDIR` environment variable, then the value stored by
`infra workdir set` in the user's config dir (platformdirs; `XDG_CONFIG_HOME` moves it).
"""

from __future__ import annotations

import os
from pathlib import Path

from runner.errors import WorkdirError
from runner.settings import config_file, read_config, write_config

ENV_VAR = "INFRA_WORKDIR"
HOW_TO_SET = (
    "set one with 'infra workdir set PATH' (or 'infra-wkdir --set PATH', or the INFRA_WORKDIR environment variable)"
)


def stored_workdir() -> Path | None:
    value = read_config().get("workdir")
    return Path(value) if value else None


def get_workdir(required: bool = True) -> Path | None:
    """The effective workdir (env first, then the stored setting); a clear exit-2 error when required and unset."""
    env = os.environ.get(ENV_VAR)
    if env:
        path, origin = Path(env).expanduser(), f"{ENV_VAR}={env}"
    else:
        path, origin = stored_workdir(), f"the setting in {config_file()}"
    if path is None:
        if required:
            raise WorkdirError(f"no workdir is set; {HOW_TO_SET}")
        return None
    if required and not path.is_dir():
        raise WorkdirError(f"workdir {path} (from {origin}) is not a directory; create it or {HOW_TO_SET}")
    return path.resolve() if path.exists() else path


def set_workdir(path: str | Path) -> Path:
    """Store `path` (made absolute) as the node's workdir; it must be an existing directory."""
    target = Path(path).expanduser().resolve()
    if not target.is_dir():
        raise WorkdirError(
            f"workdir {target} is not an existing directory; create it first (or use 'infra init {path}')"
        )
    data = read_config()
    data["workdir"] = str(target)
    write_config(data)
    return target


def clear_workdir() -> bool:
    """Forget the stored workdir; True when one was stored."""
    data = read_config()
    had = data.pop("workdir", None) is not None
    if had:
        write_config(data)
    return had
