"""Image builds: deterministic build contexts, content-hash tags, and "build only when needed".

Two images (DESIGN §7):

- base, `infra-base:<hash12>`: images/base/Dockerfile over the project source (pyproject.toml,
  README.md, runner/) and an optional wheelhouse; the hash covers that context and the build args.
- plugins, `infra-plugins:<hash12>`: images/plugins/Dockerfile over the workdir's plugin folders
  (model/ embed/ metrics/ vocab/, requirements.txt); the hash covers the base image *id* and the
  plugin files, so an unchanged workdir is never rebuilt and a plugin edit rebuilds only the top layer.

Everything up to the build is pure (`plan_base_build`, `plan_plugin_build`, `render_plugin_dockerfile`,
`write_context_tar`) so it is unit-tested and printable with `--dry-run`; `ensure_base_image` and
`ensure_plugin_image` take an engine client (from `runner.engine.get_client()`) and build when the tag
is missing. Context tars are byte-for-byte reproducible: sorted entries, zero mtimes, uid/gid 0,
normalised modes, `.dockerignore` honoured.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import runner
from runner import engine
from runner.errors import EnvironmentProblem, UsageError

log = logging.getLogger(__name__)

LABEL_KIND = "infra.kind"
LABEL_VERSION = "infra.version"
LABEL_CONTENT_HASH = "infra.content_hash"
LABEL_BASE_IMAGE = "infra.base_image"
LABEL_WORKDIR = "infra.workdir"

BASE_REPO = "infra-base"
PLUGIN_REPO = "infra-plugins"
PLUGIN_DIRS = ("model", "embed", "metrics", "vocab")
BASE_DOCKERFILE = "images/base/Dockerfile"
PLUGIN_DOCKERFILE = "images/plugins/Dockerfile"
# The base image's default BASE_IMAGE is a CUDA PyTorch runtime; these are the CPU variant's build
# args for machines that cannot pull (made by scripts/make-base-os-image.sh / make-wheelhouse.sh).
CPU_BASE_ARGS = {"BASE_IMAGE": "infra-os:bookworm", "TORCH_SPEC": "torch==2.13.0"}
SOURCE_EXCLUDES = ("**/__pycache__", "**/*.pyc", "**/*.pyo", "**/.pytest_cache", "**/*.egg-info")

# Kept byte-identical to images/plugins/Dockerfile (a test checks), so an installed runner without
# the source tree still builds plugin images.
PLUGIN_DOCKERFILE_TEXT = """\
# infra plugin image: the base image plus a workdir's plugins, in thin layers on top.
#
# Build context (made by runner/images/builds.py, or `python -m runner.images.builds context WORKDIR DIR` for bake):
#   Dockerfile  requirements.txt  wheels/  workdir/{model,embed,metrics,vocab}/
# requirements.txt is the workdir's (empty when it has none); wheels/ holds wheels for installing it
# offline (empty: install from the index). No RUN --mount: builds with BuildKit and the classic builder.
ARG BASE=infra-base:latest
FROM ${BASE}
# Extra requirements first, so editing a plugin does not reinstall them.
COPY requirements.txt /tmp/infra-plugins/requirements.txt
COPY wheels/ /tmp/infra-plugins/wheels/
RUN set -eu; \\
    if grep -qvE '^[[:space:]]*(#|$)' /tmp/infra-plugins/requirements.txt; then \\
        if ls /tmp/infra-plugins/wheels/*.whl >/dev/null 2>&1; then \\
            pip install --no-index --find-links /tmp/infra-plugins/wheels -r /tmp/infra-plugins/requirements.txt; \\
        else pip install -r /tmp/infra-plugins/requirements.txt; fi; \\
    fi; \\
    rm -rf /tmp/infra-plugins
COPY workdir/ /workdir/
ENV INFRA_WORKDIR=/workdir
"""


# --- .dockerignore --------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore glob (Go filepath.Match plus `**`) as a regex over '/'-paths."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):  # "**/" also matches zero directories
                i += 1
                out.append("(?:.*/)?")
            else:
                out.append(".*")
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                if body.startswith("^") or body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class IgnoreRules:
    """Parsed .dockerignore: later rules win; `!pattern` re-includes; a match on a parent excludes."""

    rules: tuple[tuple[bool, re.Pattern], ...] = ()

    @classmethod
    def parse(cls, text: str) -> IgnoreRules:
        rules = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            if negate:
                line = line[1:].strip()
            line = os.path.normpath(line).replace(os.sep, "/").lstrip("/")
            if line in ("", "."):
                continue
            rules.append((negate, _pattern_regex(line)))
        return cls(tuple(rules))

    @classmethod
    def from_dir(cls, root: Path, extra: Iterable[str] = ()) -> IgnoreRules:
        path = Path(root) / ".dockerignore"
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        return cls.parse("\n".join(list(extra) + [text]))

    def excluded(self, relpath: str) -> bool:
        """True when `relpath` ('/'-separated, relative to the context root) is left out."""
        parts = relpath.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for negate, regex in self.rules:
            if any(regex.match(p) for p in prefixes):
                result = not negate
        return result


# --- deterministic build contexts -----------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One member of a build context: a directory, a file on disk, or inline bytes.

    `fingerprint="stat"` hashes a file by name and size instead of content (wheels: immutable by name,
    too big to read on every decision).
    """

    arcname: str
    source: Path | None = None
    data: bytes | None = None
    is_dir: bool = False
    executable: bool = False
    fingerprint: str = "content"

    def size(self) -> int:
        if self.is_dir:
            return 0
        return len(self.data) if self.data is not None else self.source.stat().st_size

    def digest(self) -> str:
        if self.is_dir:
            return "dir"
        if self.fingerprint == "stat":
            return f"size:{self.size()}"
        h = hashlib.sha256()
        if self.data is not None:
            h.update(self.data)
        else:
            with open(self.source, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()


def collect_tree(
    root: Path, prefix: str, ignore: IgnoreRules, rel_base: str = "", fingerprint: str = "content"
) -> list[Entry]:
    """Entries for everything under `root` (itself included as a dir) at `prefix` in the context,
    skipping what `ignore` excludes (matched against `rel_base/relative path`). Symlinks to files are
    followed; other special files are skipped."""
    root = Path(root)
    entries = [Entry(prefix, is_dir=True)]
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir
        kept = []
        for d in sorted(dirnames):
            rel = f"{rel_dir}/{d}" if rel_dir else d
            if not ignore.excluded(_join(rel_base, rel)):
                kept.append(d)
                entries.append(Entry(f"{prefix}/{rel}", is_dir=True))
        dirnames[:] = kept
        for f in sorted(filenames):
            rel = f"{rel_dir}/{f}" if rel_dir else f
            path = Path(dirpath) / f
            if ignore.excluded(_join(rel_base, rel)) or not path.is_file():
                continue
            mode = path.stat().st_mode
            entries.append(
                Entry(f"{prefix}/{rel}", source=path, executable=bool(mode & stat.S_IXUSR), fingerprint=fingerprint)
            )
    return entries


def _join(base: str, rel: str) -> str:
    return f"{base}/{rel}" if base else rel


def _normalise(entries: Iterable[Entry]) -> list[Entry]:
    by_name: dict[str, Entry] = {}
    for e in entries:
        by_name[e.arcname.strip("/")] = e
    return [by_name[name] for name in sorted(by_name)]


def context_hash(entries: Iterable[Entry], extra: Mapping[str, str] | None = None) -> str:
    """sha256 over the sorted (name, kind, mode, content digest) of the entries plus `extra` items."""
    h = hashlib.sha256()
    for key, value in sorted((extra or {}).items()):
        h.update(f"extra\0{key}\0{value}\n".encode())
    for e in _normalise(entries):
        kind = "d" if e.is_dir else ("x" if e.executable else "f")
        h.update(f"{e.arcname.strip('/')}\0{kind}\0{e.digest()}\n".encode())
    return h.hexdigest()


def write_context_tar(entries: Iterable[Entry], fileobj: IO[bytes]) -> None:
    """Write the entries as an uncompressed tar, reproducibly: sorted names, mtime 0, uid/gid 0,
    no user/group names, modes 0755 for dirs and executables and 0644 otherwise."""
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in _normalise(entries):
            info = tarfile.TarInfo(e.arcname.strip("/"))
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if e.is_dir:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
                continue
            info.mode = 0o755 if e.executable else 0o644
            info.size = e.size()
            if e.data is not None:
                tar.addfile(info, io.BytesIO(e.data))
            else:
                with open(e.source, "rb") as fh:
                    tar.addfile(info, fh)


def context_tar_bytes(entries: Iterable[Entry]) -> bytes:
    """The context tar in memory (small contexts and tests; big ones go through a temp file)."""
    buf = io.BytesIO()
    write_context_tar(entries, buf)
    return buf.getvalue()


# --- build plans (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildSpec:
    """Everything needed to build one image, decided without touching the engine."""

    kind: str
    tag: str
    content_hash: str
    dockerfile: str
    buildargs: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    entries: tuple[Entry, ...] = ()

    def describe(self) -> dict:
        """A JSON-able summary for `--dry-run`."""
        return {
            "kind": self.kind,
            "tag": self.tag,
            "content_hash": self.content_hash,
            "dockerfile": self.dockerfile,
            "buildargs": self.buildargs,
            "labels": self.labels,
            "context": [e.arcname + ("/" if e.is_dir else "") for e in _normalise(self.entries)],
        }


@dataclass(frozen=True)
class ImageRef:
    """An image that exists in the engine: tag, id, content hash, and whether this call built it."""

    tag: str
    id: str
    content_hash: str
    built: bool
    seconds: float = 0.0


def render_plugin_dockerfile() -> str:
    """The plugin image's Dockerfile (identical to images/plugins/Dockerfile)."""
    return PLUGIN_DOCKERFILE_TEXT


def plugin_build_args(base_tag: str) -> dict:
    """Build args of the plugin image: the base image to build on."""
    return {"BASE": base_tag}


def base_build_args(base_image: str | None = None, torch_spec: str | None = None, version: str | None = None) -> dict:
    """Build args of the base image. None leaves the Dockerfile's default (CUDA PyTorch runtime, torch>=2.2)."""
    args = {"INFRA_VERSION": version or runner.__version__}
    if base_image:
        args["BASE_IMAGE"] = base_image
    if torch_spec:
        args["TORCH_SPEC"] = torch_spec
    return args


def labels_for(kind: str, content_hash: str, **extra: str) -> dict:
    """The `infra.*` labels every image carries."""
    labels = {LABEL_KIND: kind, LABEL_VERSION: runner.__version__, LABEL_CONTENT_HASH: content_hash}
    labels.update({f"infra.{k}": v for k, v in extra.items()})
    return labels


def plugin_context_entries(workdir: Path, wheelhouse: Path | None = None) -> list[Entry]:
    """The plugin build context: Dockerfile, requirements.txt, wheels/, workdir/<plugin dirs>.

    Missing plugin folders become empty dirs and a missing requirements.txt an empty file, so every
    workdir builds with the same Dockerfile. The workdir's .dockerignore applies inside the folders.
    Wheels are included only when there are requirements to install from them.
    """
    workdir = Path(workdir)
    ignore = IgnoreRules.from_dir(workdir, extra=SOURCE_EXCLUDES)
    entries = [
        Entry("Dockerfile", data=render_plugin_dockerfile().encode()),
        Entry("wheels", is_dir=True),
        Entry("workdir", is_dir=True),
    ]
    for name in PLUGIN_DIRS:
        folder = workdir / name
        if folder.is_dir() and not ignore.excluded(name):
            entries += collect_tree(folder, f"workdir/{name}", ignore, rel_base=name)
        else:
            entries.append(Entry(f"workdir/{name}", is_dir=True))
    req = workdir / "requirements.txt"
    req_bytes = req.read_bytes() if req.is_file() and not ignore.excluded("requirements.txt") else b""
    entries.append(Entry("requirements.txt", data=req_bytes))
    if req_bytes:
        entries.append(Entry("workdir/requirements.txt", data=req_bytes))
    if req_bytes.strip() and wheelhouse is not None:
        entries += [
            Entry(f"wheels/{p.name}", source=p, fingerprint="stat") for p in sorted(Path(wheelhouse).glob("*.whl"))
        ]
    return entries


def plan_plugin_build(workdir: Path, base_tag: str, base_id: str, wheelhouse: Path | None = None) -> BuildSpec:
    """Decide the plugin image for a workdir on a given base image id: its tag, args, labels, context."""
    entries = plugin_context_entries(workdir, wheelhouse)
    digest = context_hash(entries, {"base_id": base_id, "version": runner.__version__})
    return BuildSpec(
        kind="plugins",
        tag=f"{PLUGIN_REPO}:{digest[:12]}",
        content_hash=digest,
        dockerfile="Dockerfile",
        buildargs=plugin_build_args(base_tag),
        labels=labels_for("plugins", digest, base_image=base_id),
        entries=tuple(entries),
    )


def source_root() -> Path | None:
    """The project checkout this runner runs from (has pyproject.toml and images/), or None."""
    root = Path(runner.__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / BASE_DOCKERFILE).is_file():
        return root
    return None


def base_context_entries(root: Path, wheelhouse: Path | None = None) -> list[Entry]:
    """The base build context, laid out like the repository (what bake sends): pyproject.toml,
    README.md, runner/, images/base/Dockerfile, wheelhouse/*.whl."""
    root = Path(root)
    ignore = IgnoreRules.from_dir(root, extra=SOURCE_EXCLUDES)
    entries = [
        Entry("pyproject.toml", source=root / "pyproject.toml"),
        Entry("images", is_dir=True),
        Entry("images/base", is_dir=True),
        Entry(BASE_DOCKERFILE, source=root / BASE_DOCKERFILE),
    ]
    readme = root / "README.md"
    # pyproject names README.md as the readme: the package does not build without it.
    entries.append(Entry("README.md", source=readme) if readme.is_file() else Entry("README.md", data=b"# infra\n"))
    entries += collect_tree(root / "runner", "runner", ignore, rel_base="runner")
    wheels = sorted(Path(wheelhouse).glob("*.whl")) if wheelhouse is not None else []
    if wheels:
        entries.append(Entry("wheelhouse", is_dir=True))
        entries += [Entry(f"wheelhouse/{p.name}", source=p, fingerprint="stat") for p in wheels]
    return entries


def plan_base_build(
    root: Path, *, base_image: str | None = None, torch_spec: str | None = None, wheelhouse: Path | None = None
) -> BuildSpec:
    """Decide the base image for a source tree: tag `infra-base:<hash12>` of its context and args."""
    entries = base_context_entries(root, wheelhouse)
    args = base_build_args(base_image, torch_spec)
    digest = context_hash(entries, {f"arg:{k}": v for k, v in args.items()})
    return BuildSpec(
        kind="base",
        tag=f"{BASE_REPO}:{digest[:12]}",
        content_hash=digest,
        dockerfile=BASE_DOCKERFILE,
        buildargs=args,
        labels=labels_for("base", digest, **({"base_os": base_image} if base_image else {})),
        entries=tuple(entries),
    )


def default_wheelhouse(root: Path | None) -> Path | None:
    """INFRA_WHEELHOUSE, else <checkout>/wheelhouse when it holds wheels (scripts/make-wheelhouse.sh)."""
    env = os.environ.get("INFRA_WHEELHOUSE")
    if env:
        return Path(env)
    if root is not None and any((root / "wheelhouse").glob("*.whl")):
        return root / "wheelhouse"
    return None


# --- executors ------------------------------------------------------------------------------------


def build(client, spec: BuildSpec, on_log: Callable[[str], None] | None = None) -> ImageRef:
    """Build `spec` (streaming the log to `on_log`) from a context spooled through a temp file."""
    start = time.perf_counter()
    with tempfile.TemporaryFile(prefix="infra-context-") as fh:
        write_context_tar(spec.entries, fh)
        fh.seek(0)
        image_id = engine.build_image(
            client,
            fh,
            spec.tag,
            buildargs=spec.buildargs,
            labels=spec.labels,
            dockerfile=spec.dockerfile,
            on_log=on_log,
        )
    seconds = time.perf_counter() - start
    log.info("built %s (%s) in %.1f s", spec.tag, image_id[:19], seconds)
    return ImageRef(spec.tag, image_id, spec.content_hash, built=True, seconds=seconds)


def ensure_base_image(
    client,
    *,
    root: Path | None = None,
    base_image: str | None = None,
    torch_spec: str | None = None,
    wheelhouse: Path | None = None,
    on_log: Callable[[str], None] | None = None,
    force: bool = False,
) -> ImageRef:
    """Return the base image for this checkout, building it only when its tag is missing (or `force`).

    `base_image`/`torch_spec` None keep the Dockerfile defaults (CUDA PyTorch runtime); for a machine
    that cannot pull, pass `**CPU_BASE_ARGS`-style values. `wheelhouse` defaults to
    `default_wheelhouse()`; with wheels the build is offline. Raises EnvironmentProblem when there is
    no checkout to build from, BuildError when the build fails.
    """
    root = Path(root) if root is not None else source_root()
    if root is None:
        raise EnvironmentProblem(
            "the base image is built from the infra source tree, which this installation lacks: "
            "run from a checkout (pip install -e .) or point INFRA_BASE_IMAGE at an existing base image"
        )
    spec = plan_base_build(
        root,
        base_image=base_image,
        torch_spec=torch_spec,
        wheelhouse=wheelhouse if wheelhouse is not None else default_wheelhouse(root),
    )
    existing = None if force else engine.get_image_id(client, spec.tag)
    if existing:
        return ImageRef(spec.tag, existing, spec.content_hash, built=False)
    # The locally made OS image cannot be pulled: say how to make it instead of failing at FROM.
    if base_image and base_image.startswith("infra-os:") and not engine.image_exists(client, base_image):
        raise EnvironmentProblem(
            f"base OS image {base_image} not found: make it with 'bash scripts/make-base-os-image.sh {base_image}'"
        )
    return build(client, spec, on_log)


def ensure_plugin_image(
    client,
    workdir: Path,
    base_tag: str,
    on_log: Callable[[str], None] | None = None,
    *,
    wheelhouse: Path | None = None,
    force: bool = False,
) -> ImageRef:
    """Return the plugin image for `workdir` on `base_tag`, building it only when its tag is missing.

    The decision costs one inspect of the base, a hash of the plugin files and one inspect of the tag.
    Raises EnvironmentProblem when the base image is missing, BuildError when the build fails.
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UsageError(f"workdir {workdir} does not exist: create it with 'infra init {workdir}'")
    base_id = engine.get_image_id(client, base_tag)
    if base_id is None:
        raise EnvironmentProblem(
            f"base image {base_tag} not found in the Docker engine: build it with 'infra build --base'"
        )
    spec = plan_plugin_build(workdir, base_tag, base_id, wheelhouse)
    existing = None if force else engine.get_image_id(client, spec.tag)
    if existing:
        return ImageRef(spec.tag, existing, spec.content_hash, built=False)
    return build(client, spec, on_log)


def main(argv: list[str] | None = None) -> int:
    """`python -m runner.images.builds context WORKDIR DIR`: write the plugin build context bake builds from."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] != "context":
        print("usage: python -m runner.images.builds context WORKDIR DIR", file=sys.stderr)
        return 2
    out = Path(args[2])
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as fh:
        write_context_tar(plugin_context_entries(Path(args[1]), default_wheelhouse(None)), fh)
        fh.seek(0)
        with tarfile.open(fileobj=fh) as tar:
            tar.extractall(out, filter="data")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
