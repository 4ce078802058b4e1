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

import logging
import os
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import runner
from runner import engine
from runner.errors import EnvironmentProblem, UsageError
from runner.images.context import (  # noqa: F401  re-exported: the context API lives in runner.images.context
    ContextError,
    Entry,
    IgnoreRules,
    collect_tree,
    context_hash,
    context_tar_bytes,
    link_entry,
    normalise,
    read_small_file,
    shown,
    special_file_error,
    write_context_tar,
)
from runner.images.wheels import has_requirements, select_wheels

log = logging.getLogger(__name__)

# The lines `build` adds around the engine's output: they head each build in build.log, and the
# progress view (runner.cli.progress) reads which image is being built from them.
BUILD_START = "infra: building the {kind} image {tag}"
BUILD_DONE = "infra: built {tag} in {seconds:.1f} s"

LABEL_KIND = "infra.kind"
LABEL_VERSION = "infra.version"
LABEL_CONTENT_HASH = "infra.content_hash"
LABEL_BASE_IMAGE = "infra.base_image"
# What the core inside an image can do for the host, as a level that grows with it; an image without
# the label is level 1 (built before it existed). 2: `runner.core.predict --member` (several
# experiments predicted by one core run). The host asks before relying on it: old experiments keep
# predicting in their own images.
LABEL_CORE_API = "infra.core_api"
CORE_API = 2

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
# requirements.txt is the workdir's (empty when it has none); wheels/ holds the wheels installing it
# may need and a .offline marker when the runner has a wheelhouse (install with --no-index), and
# is empty otherwise (no requirements, or install from the index).
# Two stages: the requirements are installed in the first, and the final image copies only what pip
# installed, so the wheels never persist in a layer. No RUN --mount: builds with BuildKit and the
# classic builder.
ARG BASE=infra-base:latest
FROM ${BASE} AS requirements
# Images and build containers of this stage must not pass for the base image they start from.
LABEL infra.kind=plugins-requirements infra.content_hash=""
COPY requirements.txt /tmp/infra-plugins/requirements.txt
COPY wheels/ /tmp/infra-plugins/wheels/
RUN set -eu; \\
    mkdir -p /opt/infra-plugins/site-packages /opt/infra-plugins/bin; \\
    if grep -qvE '^[[:space:]]*(#|$)' /tmp/infra-plugins/requirements.txt; then \\
        if [ -e /tmp/infra-plugins/wheels/.offline ]; then \\
            src="--no-index --find-links /tmp/infra-plugins/wheels"; else src=""; fi; \\
        pip install --prefix /tmp/infra-plugins/prefix $src -r /tmp/infra-plugins/requirements.txt; \\
        cp -a /tmp/infra-plugins/prefix/lib/python3*/site-packages/. /opt/infra-plugins/site-packages/; \\
        if [ -d /tmp/infra-plugins/prefix/bin ]; then cp -a /tmp/infra-plugins/prefix/bin/. /opt/infra-plugins/bin/; fi; \\
    fi

FROM ${BASE}
# Extra requirements first, so editing a plugin does not reinstall them; they shadow the base's
# packages (PYTHONPATH comes before the venv), so a requirement may upgrade one.
COPY --from=requirements /opt/infra-plugins/ /opt/infra-plugins/
ENV PYTHONPATH=/opt/infra-plugins/site-packages PATH=/opt/infra-plugins/bin:$PATH
COPY workdir/ /workdir/
ENV INFRA_WORKDIR=/workdir
"""


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
            "context": [e.arcname + ("/" if e.is_dir else "") for e in normalise(self.entries)],
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
    labels = {
        LABEL_KIND: kind,
        LABEL_VERSION: runner.__version__,
        LABEL_CONTENT_HASH: content_hash,
        LABEL_CORE_API: str(CORE_API),
    }
    labels.update({f"infra.{k}": v for k, v in extra.items()})
    return labels


def plugin_context_entries(workdir: Path, wheelhouse: Path | None = None) -> list[Entry]:
    """The plugin build context: Dockerfile, requirements.txt, wheels/, workdir/<plugin dirs>.

    Missing plugin folders become empty dirs and a missing requirements.txt an empty file, so every
    workdir builds with the same Dockerfile. The workdir's .dockerignore applies inside the folders.
    Wheels are included only when requirements.txt asks for something, and then only those it may
    need (`runner.images.wheels`). The workdir is read as untrusted (`runner.images.context`): a link
    is kept as a link when it stays inside the copied plugin folders and is a ContextError (exit 2)
    naming it and its target otherwise; special files and names that are not UTF-8 are refused.
    """
    workdir = Path(os.path.realpath(workdir))
    ignore = IgnoreRules.from_dir(workdir, extra=SOURCE_EXCLUDES)
    entries = [
        Entry("Dockerfile", data=render_plugin_dockerfile().encode()),
        Entry("wheels", is_dir=True),
        Entry("workdir", is_dir=True),
    ]
    kinds = {name: _plugin_folder_kind(workdir, name, ignore) for name in PLUGIN_DIRS}
    copied = [str(workdir / name) for name, kind in kinds.items() if kind == "dir"]
    why = f"the plugin folders of {shown(workdir)} ({' '.join(n + '/' for n in PLUGIN_DIRS)})"
    for name, kind in kinds.items():
        if kind == "dir":
            entries += collect_tree(workdir / name, f"workdir/{name}", ignore, rel_base=name,
                                    link_roots=copied, link_why=why)  # fmt: skip
        elif kind == "link":
            entries.append(link_entry(f"workdir/{name}", workdir / name, copied, why))
        else:
            entries.append(Entry(f"workdir/{name}", is_dir=True))
    req_bytes = b"" if ignore.excluded("requirements.txt") else read_small_file(workdir, "requirements.txt") or b""
    try:
        req_text = req_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ContextError(
            f"{shown(workdir / 'requirements.txt')}: not valid UTF-8 (byte 0x{req_bytes[exc.start]:02x} at offset "
            f"{exc.start}); save it as UTF-8",
            shown(workdir / "requirements.txt"),
        ) from None
    entries.append(Entry("requirements.txt", data=req_bytes))
    if req_bytes:
        entries.append(Entry("workdir/requirements.txt", data=req_bytes))
    if has_requirements(req_text) and wheelhouse is not None:
        # The marker keeps the install offline even when no wheel matches: a fast, clear failure
        # instead of pip retrying an index the node cannot reach.
        entries.append(Entry("wheels/.offline", data=b"install from these wheels only (--no-index)\n"))
        entries += [
            Entry(f"wheels/{p.name}", source=p, fingerprint="stat") for p in select_wheels(req_text, wheelhouse)
        ]
    return entries


def _plugin_folder_kind(workdir: Path, name: str, ignore: IgnoreRules) -> str:
    """ "dir", "link" or "none" for a top-level plugin folder; anything else there is a ContextError."""
    if ignore.excluded(name):
        return "none"
    try:
        mode = os.lstat(workdir / name).st_mode
    except FileNotFoundError:
        return "none"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "link"
    if not stat.S_ISREG(mode):
        raise special_file_error(workdir / name, mode)
    raise ContextError(
        f"{shown(workdir / name)}: expected a folder of {name} plugins, found a file", shown(workdir / name)
    )


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
    from runner.settings import node_settings

    env = node_settings().wheelhouse
    if env:
        return Path(env)
    if root is not None and any((root / "wheelhouse").glob("*.whl")):
        return root / "wheelhouse"
    return None


# --- executors ------------------------------------------------------------------------------------


def build(client, spec: BuildSpec, on_log: Callable[[str], None] | None = None) -> ImageRef:
    """Build `spec` (streaming the log to `on_log`) from a context spooled through a temp file."""
    start = time.perf_counter()
    if on_log is not None:
        on_log(BUILD_START.format(kind=spec.kind, tag=spec.tag))
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
    if on_log is not None:
        on_log(BUILD_DONE.format(tag=spec.tag, seconds=seconds))
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
    """`python -m runner.images.builds context WORKDIR DIR`: write the plugin build context bake builds from.

    Exit 0; 2 with a one-line message when the workdir cannot be taken (see `runner.images.context`)."""
    import sys

    from runner.errors import InfraError

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] != "context":
        print("usage: python -m runner.images.builds context WORKDIR DIR", file=sys.stderr)
        return 2
    out = Path(args[2])
    try:
        entries = plugin_context_entries(Path(args[1]), default_wheelhouse(None))
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile() as fh:
            write_context_tar(entries, fh)
            fh.seek(0)
            with tarfile.open(fileobj=fh) as tar:
                tar.extractall(out, filter="data")
    except InfraError as exc:
        print(f"infra: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
