"""What an image registers, checked against plans before anything runs: names (with "did you mean") and parameters.

The registry a run will have is what plugin discovery reports for its image (`runner.workdir.plugins`:
built-ins plus the workdir's plugins, read out of process, never imported here). Discovery costs one
core start-up, so its checked document is kept in the node's cache, named by the image's content
hash (`<cache>/components/<hash>.json`): the same image always registers the same components, and a
changed plugin is a new hash. A study checks every point before any starts; a single run checks
when the image already exists (the first run of a new image is checked by the core itself, before
it reads any data, with the same "did you mean").
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from runner.errors import PlanIssue

log = logging.getLogger(__name__)

KINDS = {"model": "model", "embeddings": "embedding", "vocab": "vocab"}  # plan section → registry kind


def cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("INFRA_CACHE_DIR") or user_cache_dir("infra")) / "components"


@dataclass(frozen=True)
class Components:
    """The registered components of one image: kind → name → its parameter rows and whether it takes any."""

    by_kind: dict[str, dict[str, dict]]

    @classmethod
    def of(cls, rows: list[dict]) -> Components:
        by_kind: dict[str, dict[str, dict]] = {}
        for row in rows:
            by_kind.setdefault(row["kind"], {})[row["name"]] = row
        return cls(by_kind)

    def issues(self, plan) -> list[PlanIssue]:
        """Unknown names (with the closest registered one) and parameters the component does not take."""
        found: list[PlanIssue] = []
        for section, kind in KINDS.items():
            spec = getattr(plan, section)
            found += self._component(section, kind, spec.name, dict(spec.params))
        for i, name in enumerate(plan.metrics):
            if name not in self.by_kind.get("metric", {}):
                found.append(PlanIssue(f"metrics[{i}]", self._unknown("metric", name)))
        return found

    def _unknown(self, kind: str, name: str) -> str:
        known = sorted(self.by_kind.get(kind, {}))
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown {kind} {name!r}; {hint}registered: {', '.join(known) or 'none'}"

    def _component(self, section: str, kind: str, name: str, params: dict) -> list[PlanIssue]:
        row = self.by_kind.get(kind, {}).get(name)
        if row is None:
            return [PlanIssue(f"{section}.name", self._unknown(kind, name))]
        takes = [p["name"] for p in row["params"]]
        out = []
        unknown = [k for k in params if k not in takes]
        if unknown and not row["open_params"]:
            out.append(
                PlanIssue(
                    f"{section}.params",
                    f"{kind} {name!r} has no parameter {', '.join(map(repr, unknown))}; it takes: {', '.join(takes) or 'none'}",
                )
            )
        missing = [p["name"] for p in row["params"] if p["required"] and p["name"] not in params]
        if missing:
            out.append(PlanIssue(f"{section}.params", f"{kind} {name!r} needs {', '.join(map(repr, missing))}"))
        return out


def cached(image_hash: str) -> Components | None:
    """The components discovered for this image hash earlier on this node, if any (checked again on read)."""
    from runner import safefs
    from runner.workdir.plugins import MAX_DOCUMENT_BYTES, check_document

    path = cache_dir() / f"{image_hash}.json"
    try:  # not through a planted link, and bounded before it is parsed
        data = safefs.read_bytes(cache_dir(), f"{image_hash}.json", limit=MAX_DOCUMENT_BYTES)
        return Components.of(check_document(data, Path("/"), f"the cache file {path}"))
    except FileNotFoundError:
        return None
    except Exception as exc:  # a damaged cache entry is only a cache miss: discovery runs again
        log.warning("ignoring %s: %s", path, exc)
        return None


def components(workdir: Path, backend, prepared, on_log) -> Components:
    """The components of the image `prepared` names: from the node cache, else discovered (and cached)."""
    from runner.workdir.plugins import discover

    found = cached(prepared.image_hash)
    if found is not None:
        return found
    discovery = discover(workdir, backend, on_log)
    from runner import safefs

    try:  # a link planted at the name is replaced, never written through
        cache_dir().mkdir(parents=True, exist_ok=True)
        safefs.write_atomic(cache_dir(), f"{prepared.image_hash}.json", json.dumps(discovery.components).encode())
    except (OSError, safefs.Tampered) as exc:  # no cache: the next run discovers again
        log.warning("could not cache the components of %s: %s", prepared.image_hash, exc)
    return Components.of(discovery.components)


def check_plans(plans: list, comps: Components, labels: list[str] | None = None) -> list[PlanIssue]:
    """Every issue of every plan; with `labels`, each issue's path is prefixed by its point."""
    issues = []
    for i, plan in enumerate(plans):
        for issue in comps.issues(plan):
            where = f"[{labels[i]}] " if labels else ""
            issues.append(PlanIssue(f"{where}{issue.path}", issue.message))
    return issues
