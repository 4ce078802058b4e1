"""The node's model store: Hugging Face-format weights the `plm` embedding loads, added by the node owner.

Layout: `<store>/<name>/` holds what `infra models add NAME DIR` copied from DIR (config.json,
`*.safetensors` weights, tokenizer files) plus `infra-model.json`, written by infra:
{"name", "sha256", "bytes", "files", "added_at"}. `sha256` is the content hash `model_sha256`
computes; it is part of the experiment id of every plan that uses the model, so adding other
weights under the same name makes new experiments.

Only safetensors weights enter the store: a pickled format (`.bin`, `.pt`, …) runs code when it is
loaded, so it is refused naming the file; so are links and special files. An add is atomic: the copy
is made in `<store>/.adding-<name>-<random>` and renamed into place. The store is the node owner's
(trusted, set with `infra config set model_store PATH`), mounted read-only into the training
containers; its manifests are still read with a size cap and their shape checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from runner import safefs
from runner.errors import EnvironmentProblem, UsageError

MANIFEST = "infra-model.json"
MANIFEST_LIMIT = 1 << 20
ADDING_PREFIX = ".adding-"
REMOVING_PREFIX = ".removing-"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
SHA_RE = re.compile(r"[0-9a-f]{64}")
# Formats that unpickle (and so run code) when loaded; safetensors holds tensors only.
PICKLED = (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".pickle", ".joblib")
MAX_FILES = 10_000
MAX_DEPTH = 16
CHUNK = 1 << 20
EMBEDDING = "plm"  # the built-in embedding that reads the store


@dataclass(frozen=True)
class Model:
    """One model of the store: its folder and its checked manifest."""

    name: str
    path: Path
    sha256: str
    bytes: int
    files: tuple[str, ...]
    added_at: str

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "path": str(self.path),
            "sha256": self.sha256,
            "bytes": self.bytes,
            "files": list(self.files),
            "added_at": self.added_at,
        }


def store_path(settings=None, required: bool = True) -> Path | None:
    """The store folder of the node setting `model_store` (absolute); EnvironmentProblem (exit 3) when
    it is not set and `required`, else None."""
    from runner.settings import node_settings

    value = (settings or node_settings()).model_store
    if not value:
        if required:
            raise EnvironmentProblem(not_set_message())
        return None
    return Path(value).expanduser().absolute()


def not_set_message() -> str:
    return (
        "no model store is set on this node: run 'infra config set model_store PATH' (or set "
        "INFRA_MODEL_STORE), then 'infra models add NAME DIR'"
    )


def check_name(name: str) -> str:
    """`name` when it is a valid model name; UsageError (exit 2) saying what a name may be."""
    if isinstance(name, str) and NAME_RE.fullmatch(name):
        return name
    hint = f"; use {name.lower()!r}" if isinstance(name, str) and NAME_RE.fullmatch(name.lower()) else ""
    raise UsageError(
        f"model name {safefs.shown_path(str(name), 80)!r}: use 1-64 of a-z 0-9 . _ - starting with a letter "
        f"or digit (lower case){hint}"
    )


# --- reading the store ------------------------------------------------------------------------------


def find(name: str, settings=None) -> Model:
    """The model `name` of the store; UsageError (exit 2) naming the store and `infra models add`
    when it is not there, EnvironmentProblem when no store is set."""
    store = store_path(settings)
    check_name(name)
    model = _read_model(store, name)
    if model is None:
        raise UsageError(missing_message(name, store))
    return model


def missing_message(name: str, store: Path) -> str:
    return f"no model {name!r} in the model store {store}: add it with 'infra models add {name} DIR'"


def _read_model(store: Path, name: str) -> Model | None:
    """The model of `<store>/<name>` (None when the folder is missing); UsageError for a folder whose
    manifest is missing or damaged (an add that did not finish never has a folder of that name)."""
    try:
        raw = safefs.read_bytes(store / name, MANIFEST, limit=MANIFEST_LIMIT)
    except FileNotFoundError:
        if (store / name).is_dir():
            raise UsageError(_damaged(store, name, f"has no {MANIFEST}")) from None
        return None
    except NotADirectoryError:
        return None
    except safefs.TooLarge:
        raise UsageError(_damaged(store, name, f"has a {MANIFEST} over {MANIFEST_LIMIT >> 20} MiB")) from None
    except (safefs.Tampered, OSError) as exc:
        raise UsageError(_damaged(store, name, f"cannot be read ({getattr(exc, 'message', exc)})")) from None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        doc = None
    model = _model_of(doc, store / name)
    if model is None or model.name != name:
        raise UsageError(_damaged(store, name, f"has a {MANIFEST} infra did not write"))
    return model


def _model_of(doc, path: Path) -> Model | None:
    """A manifest's Model when its shape is right, else None."""
    if not isinstance(doc, dict):
        return None
    name, sha, size, files, added = (doc.get(k) for k in ("name", "sha256", "bytes", "files", "added_at"))
    if not (isinstance(name, str) and NAME_RE.fullmatch(name) and isinstance(sha, str) and SHA_RE.fullmatch(sha)):
        return None
    if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0 and isinstance(added, str)):
        return None
    if not isinstance(files, list) or len(files) > MAX_FILES or not all(isinstance(f, str) for f in files):
        return None
    return Model(name, path, sha, size, tuple(files), added[:40])


def _damaged(store: Path, name: str, what: str) -> str:
    return f"model folder {store / name} {what}: remove it with 'infra models rm {name}' and add it again"


def list_models(settings=None) -> tuple[Path, list[Model]]:
    """(store, its models by name); a missing store folder has none. Folders being added or removed
    (dot-names) are not models; a damaged one is a UsageError naming it."""
    store = store_path(settings)
    try:
        names = sorted(
            e.name for e in os.scandir(store) if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)
        )
    except FileNotFoundError:
        return store, []
    except OSError as exc:
        raise EnvironmentProblem(f"model store {store} cannot be read ({exc.strerror}); fix its permissions") from None
    return store, [m for m in (_read_model(store, n) for n in names) if m is not None]


# --- the content hash ---------------------------------------------------------------------------------


def model_sha256(directory: Path) -> str:
    """The content hash of a model folder: one sha256 over its regular files (all but infra-model.json)
    in the order of their sorted relative paths (`/`-separated), each as its path (UTF-8), a NUL, its
    size in decimal, a NUL, then its bytes.

    Links and special files are refused (UsageError), as `infra models add` refuses them.
    """
    digest = hashlib.sha256()
    for rel in _regular_files(Path(directory)):
        with safefs.open_read(Path(directory), rel) as fh:
            _hash_file(digest, rel, fh, lambda chunk: None)
    return digest.hexdigest()


def _hash_file(digest, rel: str, src, sink) -> int:
    """Add one file to the content hash (see `model_sha256`), passing its bytes to `sink`; its size.
    UsageError when the file changes size while it is read."""
    size = os.fstat(src.fileno()).st_size
    digest.update(f"{rel}\0{size}\0".encode())
    seen = 0
    while chunk := src.read(CHUNK):
        digest.update(chunk)
        sink(chunk)
        seen += len(chunk)
    if seen != size:
        raise UsageError(f"{rel}: changed while infra read it ({size} bytes, then {seen}); add the model again")
    return size


def _regular_files(root: Path) -> list[str]:
    """Sorted relative paths (`/`-separated) of the regular files below `root`, infra-model.json and
    hidden entries (names starting with ".") left out; UsageError naming a link, a special file, a
    name that is not UTF-8, or a tree too deep or too large."""
    found: list[str] = []
    stack: list[tuple[Path, str, int]] = [(root, "", 0)]
    while stack:
        folder, prefix, depth = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            raise UsageError(f"{folder}: cannot be read ({exc.strerror})") from None
        for entry in entries:
            if entry.name.startswith("."):  # download metadata (.cache/huggingface), .gitattributes: not the
                continue  # model, and timestamps in them would give the same weights another hash
            rel = f"{prefix}{entry.name}"
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                raise UsageError(f"{root}: the name {rel!r} is not UTF-8; rename that file") from None
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                raise UsageError(
                    f"{root / rel} is a symbolic link: the model store takes regular files only; copy the "
                    "model without links (e.g. 'huggingface-cli download --local-dir DIR' or 'cp -rL')"
                )
            if stat.S_ISDIR(mode):
                if depth + 1 > MAX_DEPTH:
                    raise UsageError(f"{root / rel}: folders nested more than {MAX_DEPTH} deep; not a model folder")
                stack.append((Path(entry.path), f"{rel}/", depth + 1))
            elif not stat.S_ISREG(mode):
                raise UsageError(f"{root / rel} is not a regular file; the model store takes regular files only")
            elif rel != MANIFEST:
                found.append(rel)
                if len(found) > MAX_FILES:
                    raise UsageError(f"{root}: more than {MAX_FILES} files; not a model folder")
    return sorted(found)


# --- adding and removing ------------------------------------------------------------------------------


def check_source(source: Path) -> list[str]:
    """The files `infra models add` copies from `source`; UsageError (exit 2) for a folder the store
    does not take: missing, a link, no config.json, no *.safetensors, a pickled weights file."""
    if source.is_symlink() or not source.is_dir():
        what = "a symbolic link" if source.is_symlink() else "not a folder" if source.exists() else "missing"
        raise UsageError(
            f"{source} is {what}: give the folder of a Hugging Face-format model (config.json, *.safetensors)"
        )
    files = _regular_files(source)
    pickled = [f for f in files if f.lower().endswith(PICKLED)]
    if pickled:
        raise UsageError(
            f"{source / pickled[0]}: pickled weights ({Path(pickled[0]).suffix}) run code when loaded and are "
            "refused; keep only the *.safetensors weights (convert them, or download the safetensors files)"
        )
    if "config.json" not in files:
        raise UsageError(f"{source} has no config.json: give the folder of a Hugging Face-format model")
    if not any(f.lower().endswith(".safetensors") for f in files):
        raise UsageError(f"{source} has no *.safetensors weights: the model store takes safetensors weights only")
    return files


def add(name: str, source: Path, replace: bool = False, settings=None) -> tuple[Model, str]:
    """Copy the model folder `source` into the store as `name`; (the model, "added" | "replaced" |
    "unchanged").

    The copy is made in a temporary folder of the store and renamed into place, so the store never
    holds a half-copied model under `name`. A name that already holds other weights is refused
    unless `replace` (its experiments keep their ids; new runs get new ones).
    """
    check_name(name)
    source = Path(source).expanduser().absolute()
    store = store_path(settings)
    real_source, real_store = source.resolve(), Path(store).resolve()
    if real_store == real_source or real_source in real_store.parents or real_store in real_source.parents:
        raise UsageError(f"{source}: a model folder and the model store {store} must not contain each other")
    files = check_source(source)
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EnvironmentProblem(
            f"cannot create the model store {store} ({exc.strerror}); fix its permissions"
        ) from None
    if not os.access(store, os.W_OK | os.X_OK):
        raise EnvironmentProblem(f"the model store {store} is not writable by this user; fix its permissions")
    staging = store / f"{ADDING_PREFIX}{name}-{secrets.token_hex(4)}"
    try:
        model = _copy(source, files, staging, name)
        outcome = _move_into_place(store, staging, name, model, replace)
    finally:
        safefs.remove_tree(staging, ignore_errors=True)  # gone after a rename; what a failure left otherwise
    return (_read_model(store, name) or model), outcome


def _copy(source: Path, files: list[str], staging: Path, name: str) -> Model:
    """Copy `files` into `staging` (links never followed, each re-checked as a regular file when
    opened), hashing as it goes; writes the manifest; the model as it will be."""
    from runner.run.records import now_iso

    os.mkdir(staging, 0o755)
    digest = hashlib.sha256()
    total = 0
    for rel in files:
        parent = Path(rel).parent
        with safefs.open_dir(staging, None if str(parent) == "." else parent, create=True) as dfd:
            # readable by the training's uid, whatever the adder's umask: the store is mounted read-only
            out_fd = os.open(
                Path(rel).name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd
            )
        with safefs.open_read(source, rel) as src, os.fdopen(out_fd, "wb") as dst:
            os.fchmod(dst.fileno(), 0o644)
            total += _hash_file(digest, rel, src, dst.write)
    _open_folders(staging)
    model = Model(name, staging, digest.hexdigest(), total, tuple(files), now_iso())
    manifest = {k: v for k, v in model.to_dict().items() if k != "path"}
    safefs.write_atomic(staging, MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), mode=0o644)
    return model


def _open_folders(root: Path) -> None:
    """Folders of the copy 0755 (made under the adder's umask): the training's uid reads them."""
    for folder, dirs, _ in os.walk(root):
        for d in dirs:
            os.chmod(Path(folder) / d, 0o755, follow_symlinks=False)
    os.chmod(root, 0o755)


def _move_into_place(store: Path, staging: Path, name: str, model: Model, replace: bool) -> str:
    """Rename the finished copy to `<store>/<name>` under the store's lock; the old model (with
    `replace`) is moved aside first and removed after."""
    from filelock import FileLock

    with FileLock(str(store / ".lock")):
        old = _read_model(store, name) if (store / name).is_dir() or (store / name).is_symlink() else None
        if old is None and os.path.lexists(store / name):
            raise UsageError(f"{store / name} exists and is not a model folder; remove it by hand")
        if old is not None and old.sha256 == model.sha256:
            return "unchanged"
        if old is not None and not replace:
            raise UsageError(
                f"model {name!r} is already in the store with other weights (sha256 {old.sha256[:12]}); "
                f"pass --replace to replace them (new runs get new experiment ids) or choose another name"
            )
        aside = store / f"{REMOVING_PREFIX}{name}-{secrets.token_hex(4)}"
        if old is not None:
            os.rename(store / name, aside)
        os.rename(staging, store / name)
    safefs.remove_tree(aside)
    return "replaced" if old is not None else "added"


def remove(name: str, settings=None) -> Model:
    """Remove the model `name` from the store (moved aside under the lock, then deleted); the model
    removed. UsageError when it is not there."""
    from filelock import FileLock

    model = find(name, settings)
    store = model.path.parent
    if not os.access(store, os.W_OK | os.X_OK):
        raise EnvironmentProblem(f"the model store {store} is not writable by this user; fix its permissions")
    aside = store / f"{REMOVING_PREFIX}{name}-{secrets.token_hex(4)}"
    with FileLock(str(store / ".lock")):
        os.rename(model.path, aside)
    safefs.remove_tree(aside)
    return model


# --- plans --------------------------------------------------------------------------------------------


def plan_model(embeddings) -> str | None:
    """The model name a plan's `embeddings` (typed spec or its JSON) asks the store for; None when the
    embedding is not `plm`, "" when `plm` names no model."""
    name = embeddings.get("name") if isinstance(embeddings, dict) else getattr(embeddings, "name", None)
    params = embeddings.get("params") if isinstance(embeddings, dict) else getattr(embeddings, "params", None)
    if name != EMBEDDING:
        return None
    model = (params or {}).get("model")
    return model if isinstance(model, str) else ""


def plan_weights(resolved: dict, settings=None) -> str | None:
    """The sha256 of the weights a resolved plan's `plm` embedding uses (None for another embedding):
    part of its experiment id. The errors of `find`."""
    name = plan_model(resolved.get("embeddings") or {})
    if name is None:
        return None
    return find(name, settings).sha256


def plan_issue(embeddings, settings=None) -> str | None:
    """What is wrong with the model a plan's embeddings name on this node (None when nothing is, or
    the embedding is not `plm`): for `infra validate` and every run's plan check."""
    name = plan_model(embeddings)
    if name is None:
        return None
    store = store_path(settings, required=False)
    if store is None:
        return not_set_message()
    if not name:
        return f'name a model of the model store {store} (\'infra models list\'), e.g. "model": "esm2_t12_35m"'
    if not NAME_RE.fullmatch(name):
        return f"{name[:80]!r} is not a model name (1-64 of a-z 0-9 . _ -); see 'infra models list'"
    with contextlib.suppress(UsageError):
        if _read_model(store, name) is not None:
            return None
        return missing_message(name, store)
    return _damaged(store, name, "is damaged")
