"""Which wheels a plugin image's requirements need, decided cheaply on the host (no pip, no network).

A requirements.txt of comments and blank lines has no requirements: no wheel enters the build
context. Otherwise the wheels are the closure of the named projects over the `Requires-Dist` lines of
the wheels' own METADATA, markers and extras ignored (a superset: pip picks from it). Anything this
reading cannot follow (an option line such as `-r` or `--find-links`, a URL or path, an unreadable
wheel) falls back to the whole wheelhouse; the wheels never persist in the image either way (the
plugin Dockerfile installs them in a build stage that the final image does not inherit).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(\[[^\]]*\])?")
_REQUIRES = re.compile(r"^Requires-Dist:\s*(.+)$", re.M)


def canonical(name: str) -> str:
    """PEP 503 project name: lower case, runs of `-_.` as one `-`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_lines(text: str) -> list[str]:
    """The lines that ask for something: comments (`#` at the start or after a space) and blanks dropped."""
    lines = []
    for raw in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if line:
            lines.append(line)
    return lines


def has_requirements(text: str) -> bool:
    """True when requirements.txt asks for anything (what the plugin Dockerfile's grep decides too)."""
    return bool(requirement_lines(text))


def _project(filename: str) -> str:
    return canonical(filename.split("-", 1)[0])


def _requires(wheel: Path) -> list[str] | None:
    """Project names a wheel requires (all of them, whatever their markers), None when unreadable."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            meta = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
            if len(meta) != 1:
                return None
            text = zf.read(meta[0]).decode("utf-8", "replace")
    except (OSError, zipfile.BadZipFile):
        return None
    names = []
    for spec in _REQUIRES.findall(text):
        match = _NAME.match(spec)
        if match:
            names.append(canonical(match.group(1)))
    return names


def select_wheels(requirements: str, wheelhouse: Path | None) -> list[Path]:
    """The wheels of `wheelhouse` that installing `requirements` may need, sorted by name."""
    lines = requirement_lines(requirements)
    if not lines or wheelhouse is None:
        return []
    wheels = sorted(Path(wheelhouse).glob("*.whl"))
    wanted = []
    for line in lines:
        match = _NAME.match(line)
        rest = line[match.end() :].strip() if match else line
        if match is None or line.startswith("-") or "/" in line or "@" in rest.split(";")[0]:
            return wheels  # options, URLs, paths: not something to follow here
        wanted.append(canonical(match.group(1)))
    by_project: dict[str, list[Path]] = {}
    for wheel in wheels:
        by_project.setdefault(_project(wheel.name), []).append(wheel)
    seen: set[str] = set()
    while wanted:
        name = wanted.pop()
        if name in seen:
            continue
        seen.add(name)
        for wheel in by_project.get(name, []):
            requires = _requires(wheel)
            if requires is None:
                return wheels
            wanted += requires
    return [w for w in wheels if _project(w.name) in seen]
