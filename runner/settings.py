"""Node settings: one frozen object, read at call time (flag → `INFRA_*` environment → config file → default).

The config file is the user's `config.json` in the platformdirs config dir (`XDG_CONFIG_HOME` moves
it); `infra workdir set` stores the workdir there and the keys below can be stored under "node".
Nothing is read at import time, so a test or a long-lived worker sees a changed environment.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

from runner.errors import UsageError


def config_dir() -> Path:
    from platformdirs import user_config_dir

    return Path(user_config_dir("infra", appauthor=False))


def config_file() -> Path:
    return config_dir() / "config.json"


def read_config() -> dict:
    """The config file's object ({} when there is none); a damaged file is a one-line UsageError."""
    path = config_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UsageError(f"config file {path} is unreadable ({exc}); fix or delete it") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a JSON object; fix or delete it")
    return data


def write_config(data: dict) -> None:
    from runner import safefs

    path = config_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    safefs.write_atomic(path.parent, path.name, (json.dumps(data, indent=2) + "\n").encode())


@dataclass(frozen=True)
class NodeSettings:
    """What this node uses for images, limits and the training's identity (docs/security.md)."""

    base_image: str | None = None  # INFRA_BASE_IMAGE: a ready base image instead of building one
    base_os: str | None = None  # INFRA_BASE_OS: the base build's BASE_IMAGE build arg
    torch_spec: str | None = None  # INFRA_TORCH_SPEC: torch requirement of the base build
    wheelhouse: str | None = None  # INFRA_WHEELHOUSE: wheels for offline builds
    min_free_bytes: int = 1 << 30  # INFRA_MIN_FREE_BYTES: pre-flight free space under experiments/
    train_uid: int = 10001  # INFRA_TRAIN_UID: the training's uid when infra runs as root
    train_gid: int = 10001  # INFRA_TRAIN_GID
    pids_limit: int = 4096  # INFRA_PIDS_LIMIT: processes + threads of one training container
    log_limit_bytes: int = 100 << 20  # INFRA_LOG_LIMIT: captured output kept per experiment


ENV = {
    "base_image": "INFRA_BASE_IMAGE",
    "base_os": "INFRA_BASE_OS",
    "torch_spec": "INFRA_TORCH_SPEC",
    "wheelhouse": "INFRA_WHEELHOUSE",
    "min_free_bytes": "INFRA_MIN_FREE_BYTES",
    "train_uid": "INFRA_TRAIN_UID",
    "train_gid": "INFRA_TRAIN_GID",
    "pids_limit": "INFRA_PIDS_LIMIT",
    "log_limit_bytes": "INFRA_LOG_LIMIT",
}
BOUNDS = {
    "train_uid": (1, 2**31 - 2),
    "train_gid": (1, 2**31 - 2),
    "pids_limit": (64, 1 << 22),
    "log_limit_bytes": (1 << 20, 1 << 40),
    "min_free_bytes": (0, 1 << 50),
}


def node_settings(env: dict | None = None, **overrides) -> NodeSettings:
    """The settings in force now; `overrides` (flags) win over the environment (`env`, default
    os.environ) and the config file."""
    env_vars = os.environ if env is None else env
    stored = read_config().get("node") or {}
    if not isinstance(stored, dict):
        raise UsageError(f"config file {config_file()}: 'node' must be an object")
    values = {}
    for f in fields(NodeSettings):
        env_value = env_vars.get(ENV[f.name])
        if f.name in overrides and overrides[f.name] is not None:
            raw, origin = overrides[f.name], f"--{f.name.replace('_', '-')}"
        elif env_value not in (None, ""):
            raw, origin = env_value, ENV[f.name]
        elif f.name in stored:
            raw, origin = stored[f.name], f"{config_file()} node.{f.name}"
        else:
            continue
        values[f.name] = _coerce(f.name, raw, origin)
    return NodeSettings(**values)


_SIZE_RE = re.compile(r"(\d+)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def _size(raw) -> int | None:
    """`100M`, `2G`, `500000` (bytes, binary units) → bytes; None when it is not a size."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    m = _SIZE_RE.fullmatch(str(raw).strip())
    if not m:
        return None
    unit = m.group(2).lower()
    return int(m.group(1)) << (10 * ("kmgt".index(unit) + 1) if unit else 0)


def _coerce(name: str, raw, origin: str):
    if name == "log_limit_bytes":
        value = _size(raw)
        if value is None or not BOUNDS[name][0] <= value <= BOUNDS[name][1]:
            raise UsageError(
                f"{origin}={raw!r}: use a size of at least 1M, like 100M or 2G (bytes, or K/M/G/T binary units)"
            )
        return value
    if name not in BOUNDS:
        if not isinstance(raw, str):
            raise UsageError(f"{origin}: must be a string")
        return raw
    try:
        value = int(raw) if not isinstance(raw, bool) else None
    except (TypeError, ValueError):
        value = None
    low, high = BOUNDS[name]
    if name in ("train_uid", "train_gid") and value == 0:
        raise UsageError(f"{origin}={raw!r}: containers run as an unprivileged user; set a number other than 0")
    if value is None or not low <= value <= high:
        raise UsageError(f"{origin}={raw!r}: must be a whole number from {low} to {high}")
    return value
