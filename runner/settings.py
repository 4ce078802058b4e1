"""Node settings: one frozen object, read at call time (flag → `INFRA_*` environment → config file → default).

The config file is the user's `config.json` in the platformdirs config dir (`XDG_CONFIG_HOME` moves
it); `infra workdir set` stores the workdir there and `infra config set` the keys of `KEYS` under
"node". `KEYS` is the one place that knows the keys, their environment variables and kinds.
Nothing is read at import time, so a test or a long-lived worker sees a changed environment.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from contextlib import contextmanager
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
    slot_alive_timeout: int = 60  # INFRA_SLOT_ALIVE_TIMEOUT: a study slot whose host is silent this long stops
    slot_idle_exit: int = 600  # INFRA_SLOT_IDLE_EXIT: a study slot with no point for this long exits


@dataclass(frozen=True)
class Key:
    """One node setting as `infra config` and `node_settings` know it: its environment variable, the
    kind of value (`text`, `path`, `int`, `size`) and what it does. The one table of the keys."""

    env: str
    kind: str
    help: str


KEYS = {
    "base_image": Key("INFRA_BASE_IMAGE", "text", "a ready base image to use instead of building one"),
    "base_os": Key("INFRA_BASE_OS", "text", "BASE_IMAGE build arg of the base build (e.g. infra-os:bookworm)"),
    "torch_spec": Key("INFRA_TORCH_SPEC", "text", "torch requirement of the base build (e.g. torch==2.13.0)"),
    "wheelhouse": Key("INFRA_WHEELHOUSE", "path", "folder of wheels for offline builds"),
    "min_free_bytes": Key("INFRA_MIN_FREE_BYTES", "int", "free bytes needed under experiments/ before a run"),
    "train_uid": Key("INFRA_TRAIN_UID", "int", "the training's uid when infra runs as root (never 0)"),
    "train_gid": Key("INFRA_TRAIN_GID", "int", "the training's gid when infra runs as root (never 0)"),
    "pids_limit": Key("INFRA_PIDS_LIMIT", "int", "processes + threads of one training container"),
    "log_limit_bytes": Key("INFRA_LOG_LIMIT", "size", "captured output kept per experiment (e.g. 100M, 2G)"),
    "slot_alive_timeout": Key(
        "INFRA_SLOT_ALIVE_TIMEOUT", "int", "seconds a study slot runs on after its host stopped (killed runner)"
    ),
    "slot_idle_exit": Key("INFRA_SLOT_IDLE_EXIT", "int", "seconds a study slot (a worker's warm one) waits idle"),
}
assert set(KEYS) == {f.name for f in fields(NodeSettings)}
ENV = {name: key.env for name, key in KEYS.items()}
BOUNDS = {
    "train_uid": (1, 2**31 - 2),
    "train_gid": (1, 2**31 - 2),
    "pids_limit": (64, 1 << 22),
    "log_limit_bytes": (1 << 20, 1 << 40),
    "min_free_bytes": (0, 1 << 50),
    "slot_alive_timeout": (2, 86400),
    "slot_idle_exit": (1, 7 * 86400),
}
MAX_TEXT = 4096


def _stored_node() -> dict:
    stored = read_config().get("node") or {}
    if not isinstance(stored, dict):
        raise UsageError(f"config file {config_file()}: 'node' must be an object; fix it or run 'infra config list'")
    return stored


def _pick(name: str, overrides: dict, env_vars, stored: dict) -> tuple[object, str, str] | None:
    """(raw value, origin for messages, source) of one key by precedence, None for the default."""
    env_value = env_vars.get(KEYS[name].env)
    if overrides.get(name) is not None:
        return overrides[name], f"--{name.replace('_', '-')}", "flag"
    if env_value not in (None, ""):
        return env_value, KEYS[name].env, "env"
    if name in stored:
        return stored[name], f"{config_file()} node.{name}", "config"
    return None


def node_settings(env: dict | None = None, **overrides) -> NodeSettings:
    """The settings in force now; `overrides` (flags) win over the environment (`env`, default
    os.environ), which wins over the config file's "node" section (`infra config set`)."""
    env_vars = os.environ if env is None else env
    stored = _stored_node()
    values = {}
    for name in KEYS:
        picked = _pick(name, overrides, env_vars, stored)
        if picked is not None:
            values[name] = _coerce(name, picked[0], picked[1])
    return NodeSettings(**values)


def describe_settings(env: dict | None = None) -> list[dict]:
    """Every node setting for `infra config list`: key, env var, value in force and its source
    (`env`, `config` or `default`), and what the config file stores (also when the env overrides it)."""
    env_vars = os.environ if env is None else env
    stored = _stored_node()
    defaults = NodeSettings()
    rows = []
    for name, key in KEYS.items():
        picked = _pick(name, {}, env_vars, stored)
        value = _coerce(name, picked[0], picked[1]) if picked else getattr(defaults, name)
        in_file = _coerce(name, stored[name], f"{config_file()} node.{name}") if name in stored else None
        rows.append(
            {
                "key": name,
                "env": key.env,
                "value": value,
                "source": picked[2] if picked else "default",
                "stored": in_file,
                "help": key.help,
            }
        )
    return rows


def setting_name(key: str) -> str:
    """The setting `key` names (its name, or its environment variable); UsageError listing the keys."""
    lowered = key.strip().lower()
    for name, spec in KEYS.items():
        if lowered in (name, spec.env.lower()):
            return name
    raise UsageError(f"unknown node setting {key!r}; valid keys: {', '.join(KEYS)} (see 'infra config list')")


def set_setting(key: str, raw: str) -> tuple[str, object]:
    """Validate `raw` for `key` and store it in the config file's "node" section; (name, stored value).

    A path is stored absolute (the file is read from any directory); sizes and numbers are stored
    as numbers.
    """
    name = setting_name(key)
    value = _coerce(name, raw, f"infra config set {name}")
    if KEYS[name].kind == "path":
        value = str(Path(value).expanduser().resolve())

    def change(data: dict) -> None:
        node = data.get("node")
        data["node"] = {**(node if isinstance(node, dict) else {}), name: value}

    update_config(change)
    return name, value


def unset_setting(key: str) -> tuple[str, bool]:
    """Remove `key` from the config file; (name, whether it was stored)."""
    name = setting_name(key)

    def change(data: dict) -> bool:
        node = data.get("node")
        return isinstance(node, dict) and node.pop(name, None) is not None

    return name, update_config(change)


@contextmanager
def _config_lock():
    """An exclusive lock on the config dir for a read-modify-write of the config file."""
    folder = config_dir()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".config.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def update_config(change):
    """Apply `change(data)` to the config file's object under the lock and write it atomically;
    returns what `change` returned. Two `infra config set` at once never lose each other's key."""
    with _config_lock():
        data = read_config()
        result = change(data)
        write_config(data)
    return result


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
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
        if not isinstance(raw, str) or not raw.strip() or len(raw) > MAX_TEXT or _CONTROL.search(raw):
            raise UsageError(f"{origin}: must be a non-empty line of text of at most {MAX_TEXT} characters")
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
