"""Node settings: one frozen object, read at call time (flag → `INFRA_*` environment → config file → default).

The config file is the user's `config.json` in the platformdirs config dir (`XDG_CONFIG_HOME` moves
it); `infra workdir set` stores the workdir there and `infra config set` the keys of `KEYS` under
"node". `KEYS` is the one place that knows the keys, their environment variables and kinds.
Nothing is read at import time, so a test or a long-lived worker sees a changed environment.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

from runner.errors import UsageError


def config_dir() -> Path:
    from platformdirs import user_config_dir

    return Path(user_config_dir("infra", appauthor=False))


def config_file() -> Path:
    return config_dir() / "config.json"


CONFIG_LIMIT = 1 << 20  # the config file holds a few settings; more is not a config file


def read_config() -> dict:
    """The config file's object ({} when there is none); a damaged file is a one-line UsageError.

    Opened without following a link and without blocking (a FIFO there must not hang every
    command), then checked to be a regular file of at most 1 MiB; the keys infra reads from the top
    level (`workdir`, `node`) are checked for their kind here, so no command trips over them later.
    """
    path = config_file()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(f"config file {path} is a symbolic link; infra reads only a regular file there") from None
        raise UsageError(f"config file {path} is unreadable ({exc.strerror}); fix or delete it") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"config file {path} is not a regular file; delete it (infra writes a new one)")
        raw = handle.read(CONFIG_LIMIT + 1)
    if len(raw) > CONFIG_LIMIT:
        raise UsageError(f"config file {path} is larger than {CONFIG_LIMIT >> 20} MiB; fix or delete it")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"config file {path} is unreadable ({exc}); fix or delete it") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a JSON object; fix or delete it")
    workdir = data.get("workdir")
    if workdir is not None and (not isinstance(workdir, str) or "\x00" in workdir):
        raise UsageError(
            f"config file {path}: 'workdir' must be a folder's path as text, not {_shown(workdir)}; "
            "fix the file or delete it, then run 'infra workdir set PATH'"
        )
    if not isinstance(data.get("node", {}), dict):
        raise UsageError(f"config file {path}: 'node' must be an object; fix the file or delete it")
    return data


def _shown(value) -> str:
    """A JSON value for an error message: short, one line."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
    tracking_hosts: tuple[str, ...] = ()  # INFRA_TRACKING_HOSTS: MLflow servers (host[:port]) infra may log to
    tracking_timeout: int = 60  # INFRA_TRACKING_TIMEOUT: seconds for logging one attempt, all requests together
    model_store: str | None = None  # INFRA_MODEL_STORE: the folder of the models `infra models add` registers


@dataclass(frozen=True)
class Key:
    """One node setting as `infra config` and `node_settings` know it: its environment variable, the
    kind of value (`text`, `requirement`, `hosts`, `path`, `int`, `size`) and what it does. The one
    table of the keys."""

    env: str
    kind: str
    help: str


KEYS = {
    "base_image": Key("INFRA_BASE_IMAGE", "text", "a ready base image to use instead of building one"),
    "base_os": Key("INFRA_BASE_OS", "text", "BASE_IMAGE build arg of the base build (e.g. infra-os:bookworm)"),
    "torch_spec": Key("INFRA_TORCH_SPEC", "requirement", "torch requirement of the base build (e.g. torch==2.13.0)"),
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
    "tracking_hosts": Key(
        "INFRA_TRACKING_HOSTS",
        "hosts",
        "MLflow servers infra may log to, with credentials: HOST[:PORT] (https), http://HOST[:PORT],...",
    ),
    "tracking_timeout": Key("INFRA_TRACKING_TIMEOUT", "int", "seconds for logging one attempt to MLflow, in all"),
    "model_store": Key(
        "INFRA_MODEL_STORE", "path", "folder of the models of the plm embedding (infra models add), mounted read-only"
    ),
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
    "tracking_timeout": (1, 3600),
}
MAX_TEXT = 4096
MAX_HOSTS = 64


def _stored_node() -> dict:
    return read_config().get("node") or {}  # its kind is checked by read_config


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


# A requirement specifier, nothing else: a name, optional extras, optional version clauses. It
# becomes one argument of the base build's `pip install`; an option (`--index-url=…`), a URL or a
# marker would change where pip fetches code from.
_VERSION_CLAUSE = r"(?:===|==|!=|~=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+"
_REQUIREMENT_RE = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
    r"(?:\s*\[\s*[A-Za-z0-9._-]+(?:\s*,\s*[A-Za-z0-9._-]+)*\s*\])?"
    rf"(?:\s*{_VERSION_CLAUSE}(?:\s*,\s*{_VERSION_CLAUSE})*)?"
)
# One server as `host`, `host:port` or `[v6]:port`, compared as text (never resolved).
_HOST_RE = re.compile(
    r"(?:\[(?P<v6>[0-9a-f:.]{2,45})\]|(?P<name>[a-z0-9](?:[a-z0-9._-]{0,251}[a-z0-9])?))(?::(?P<port>[0-9]{1,5}))?"
)


def parse_host(text: str) -> tuple[str, int | None] | None:
    """`Mlflow.Lab:5000` → ("mlflow.lab", 5000); `[::1]` → ("[::1]", None); None for anything else."""
    m = _HOST_RE.fullmatch(text.strip().lower())
    if not m:
        return None
    port = int(m["port"]) if m["port"] else None
    if port is not None and not 1 <= port <= 65535:
        return None
    return (f"[{m['v6']}]" if m["v6"] else m["name"]), port


def _hosts(raw) -> tuple[str, ...] | None:
    """`a.lab:5000, b.lab` (or the file's list) → ("a.lab:5000", "b.lab"); None when one entry is not a host."""
    items = raw.split(",") if isinstance(raw, str) else raw if isinstance(raw, list) else None
    if not items or len(items) > MAX_HOSTS or not all(isinstance(item, str) for item in items):
        return None
    out = []
    for item in items:
        # plain `host[:port]` (or `https://…`) allows https only; cleartext http must be listed as
        # `http://host[:port]`, so a plan cannot downgrade a listed server and send the credentials in clear
        text = item.strip()
        scheme = "http://" if text.lower().startswith("http://") else ""
        text = (
            text[len("http://") :]
            if scheme
            else text[len("https://") :]
            if text.lower().startswith("https://")
            else text
        )
        parsed = parse_host(text)
        if parsed is None:
            return None
        host, port = parsed
        out.append(scheme + (host if port is None else f"{host}:{port}"))
    return tuple(dict.fromkeys(out))


def _coerce(name: str, raw, origin: str):
    kind = KEYS[name].kind
    if kind == "hosts":
        value = _hosts(raw)
        if value is None:
            raise UsageError(
                f"{origin}: use a comma-separated list of at most {MAX_HOSTS} servers as HOST or HOST:PORT for "
                "https, http://HOST[:PORT] for cleartext http (a name or an IP address, [v6] in brackets), "
                "e.g. mlflow.lab:5000,http://10.0.0.5:5000"
            )
        return value
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
        if kind == "requirement" and not _REQUIREMENT_RE.fullmatch(raw.strip()):
            raise UsageError(
                f"{origin}={raw!r}: use a requirement specifier only: a name, optional [extras] and version "
                "clauses, e.g. torch==2.13.0 or torch>=2.2,<3 (no pip options, URLs or markers)"
            )
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
