"""Which images a workdir runs in: the base (INFRA_BASE_IMAGE, or built from this checkout) and the
plugin image on top of it.

`decide_image` is what `infra run`, `infra build` and plugin discovery use: it ensures the base
(building it when missing) and plans the plugin image. `plan_images` is its side-effect-free twin for
`infra build --dry-run`: it only inspects, and says what would be built, the base step included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runner.errors import EnvironmentProblem
from runner.images import builds
from runner.settings import node_settings


@dataclass
class ImageDecision:
    """The plugin image a workdir runs in: its base tag, its build spec, and its id when it exists."""

    base_tag: str
    spec: builds.BuildSpec
    image_id: str | None  # None: must be built


def _base_args() -> dict:
    settings = node_settings()
    return {"base_image": settings.base_os, "torch_spec": settings.torch_spec}


def ensure_base(client, on_log: Callable[[str], None], force: bool = False) -> builds.ImageRef:
    """The base image by the node settings: INFRA_BASE_IMAGE as it is (never built), else built from this
    checkout with the settings' base OS and torch spec when its tag is missing (or `force`).

    `infra run`, plugin discovery and `infra build --base` all come here, so they build the same
    base that `infra build --dry-run` shows."""
    from runner import engine

    ready = node_settings().base_image
    if ready:
        base_id = engine.get_image_id(client, ready)
        if base_id is None:
            raise EnvironmentProblem(f"INFRA_BASE_IMAGE={ready} is not in the Docker engine; build or load it first")
        return builds.ImageRef(ready, base_id, None, built=False)
    return builds.ensure_base_image(client, on_log=on_log, force=force, **_base_args())


def decide_image(client, workdir: Path, on_log: Callable[[str], None]) -> ImageDecision:
    """Ensure the base image (`ensure_base`) and plan the plugin image."""
    from runner import engine

    base = ensure_base(client, on_log)
    spec = builds.plan_plugin_build(workdir, base.tag, base.id, builds.default_wheelhouse(builds.source_root()))
    return ImageDecision(base.tag, spec, engine.get_image_id(client, spec.tag))


def plan_base(client) -> dict:
    """What the base step would do, without doing it: {"tag", "source", "exists", "id", "would_build", …}.

    `client` None (no engine) leaves `exists` None. Raises EnvironmentProblem only when there is no
    checkout to plan a base build from and INFRA_BASE_IMAGE is unset.
    """
    from runner import engine

    ready = node_settings().base_image
    if ready:
        image_id = engine.get_image_id(client, ready) if client is not None else None
        doc = {"tag": ready, "source": "INFRA_BASE_IMAGE", "would_build": False}
        doc.update(exists=None if client is None else image_id is not None, id=image_id)
        if client is not None and image_id is None:
            doc["problem"] = f"INFRA_BASE_IMAGE={ready} is not in the Docker engine; build or load it first"
        return doc
    root = builds.source_root()
    if root is None:
        raise EnvironmentProblem(
            "the base image is built from the infra source tree, which this installation lacks: "
            "run from a checkout (pip install -e .) or point INFRA_BASE_IMAGE at an existing base image"
        )
    spec = builds.plan_base_build(root, wheelhouse=builds.default_wheelhouse(root), **_base_args())
    image_id = engine.get_image_id(client, spec.tag) if client is not None else None
    exists = None if client is None else image_id is not None
    return {**spec.describe(), "source": "checkout", "exists": exists, "id": image_id, "would_build": not exists}


def plan_images(client, workdir: Path | None) -> dict:
    """The dry run of `infra build`: the base step and (with a workdir) the plugin step; builds nothing.

    The plugin image's tag hashes the base image's id, so while the base is missing it cannot be
    known yet: the plugin entry then has `tag` None and says so in `note`.
    """
    from runner import engine

    base = plan_base(client)
    doc = {"base": base}
    if workdir is None:
        return doc
    if base.get("id"):
        spec = builds.plan_plugin_build(
            workdir, base["tag"], base["id"], builds.default_wheelhouse(builds.source_root())
        )
        image_id = engine.get_image_id(client, spec.tag) if client is not None else None
        doc["plugins"] = {**spec.describe(), "exists": image_id is not None, "id": image_id,
                          "would_build": image_id is None}  # fmt: skip
    else:
        # Read the workdir anyway, so a dry run reports the same workdir errors a build would.
        entries = builds.plugin_context_entries(workdir, builds.default_wheelhouse(builds.source_root()))
        doc["plugins"] = {
            "kind": "plugins",
            "tag": None,
            "content_hash": None,
            "exists": False if base.get("exists") is False else None,
            "would_build": True,
            "context": [e.arcname + ("/" if e.is_dir else "") for e in builds.normalise(entries)],
            "note": "the plugin image's tag hashes the base image id, known once the base image exists",
        }
    return doc
