"""`infra init`: a new workdir from `plugins_template/`."""

from __future__ import annotations

import shutil
from pathlib import Path

from runner.errors import EnvironmentProblem, UsageError

SKIPPED_DIRS = {"__pycache__", "experiments", ".pytest_cache"}
SKIPPED_SUFFIXES = {".pyc", ".db", ".db-wal", ".db-shm"}


def template_dir() -> Path:
    """The plugins_template/ folder of the checkout this runner runs from."""
    path = Path(__file__).resolve().parents[2] / "plugins_template"
    if not path.is_dir():
        raise EnvironmentProblem(f"plugins_template/ is not next to the runner ({path}); install infra from a checkout")
    return path


def init_workdir(dest: Path, force: bool = False) -> list[str]:
    """Copy the template into `dest`; refuse a non-empty `dest` unless `force` (then existing files are kept)."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise UsageError(
            f"{dest} is not empty; choose a new directory or pass --force to add the missing template files"
        )
    src = template_dir()
    created = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if SKIPPED_DIRS.intersection(rel.parts) or path.suffix in SKIPPED_SUFFIXES:
            continue
        target = dest / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            created.append(str(rel))
    (dest / "experiments").mkdir(parents=True, exist_ok=True)
    return created
