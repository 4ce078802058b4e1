"""A plan as a JSON document: text → checked JSON (no repeated keys, NaN or runaway nesting) → dotted
keys expanded → `--set` overrides applied. Pure; no pydantic model is involved yet (`runner.plan.issues`
validates, `runner.plan.load` adds the semantic and database checks).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from runner.errors import PlanError, PlanIssue, UsageError

STDIN = "-"

# Below these keys the user's dictionaries are passed to factories as they are: no dotted expansion.
OPAQUE_KEYS = {"params"}


def read_plan_text(source: str) -> tuple[str, str, Path]:
    """Return (text, display name, folder relative paths resolve against) for a file path or '-'."""
    if source == STDIN:
        return sys.stdin.read(), "<stdin>", Path.cwd()
    path = Path(source)
    if path.is_dir():
        raise UsageError(f"{source} is a directory; pass the plan's JSON file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"plan file {source} does not exist; check the path (or pass '-' to read stdin)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"plan file {source} cannot be read: {exc}") from None
    return text, source, path.resolve().parent


MAX_DEPTH = 64  # deeper JSON is refused: nothing in a plan nests like that, and deep nesting exhausts the stack


def _loads(text: str) -> tuple[Any, dict[int, list[str]]]:
    """json.loads that also returns the keys each object repeated (by id of the object).

    JSON parsers keep the last of two equal keys; a plan with `"lr"` twice almost certainly has a
    mistake in it, so repeats are collected and reported instead.
    """
    repeated: dict[int, list[str]] = {}

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in items:
            if key in obj:
                repeated.setdefault(id(obj), []).append(key)
            obj[key] = value
        return obj

    return json.loads(text, object_pairs_hook=pairs), repeated


def value_issues(doc: Any, repeated: dict[int, list[str]] | None = None, prefix: str = "") -> list[PlanIssue]:
    """Repeated keys, NaN/Infinity (also 1e999, which JSON parsers turn into Infinity) and nesting
    deeper than MAX_DEPTH anywhere in a document, each with its key path. Iterative: no recursion."""
    issues: list[PlanIssue] = []
    stack: list[tuple[Any, str, int]] = [(doc, prefix, 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            issues.append(
                PlanIssue(
                    path, "must be a finite number (NaN, Infinity and numbers beyond ±1.8e308 are not JSON numbers)"
                )
            )
        elif isinstance(value, dict | list):
            if depth >= MAX_DEPTH:
                head = path[:60]
                shown = path if len(path) <= 80 else f"{head[: head.rfind(']') + 1] or head}…({depth} levels)"
                issues.append(PlanIssue(shown, f"nests deeper than {MAX_DEPTH} levels; a plan never needs that"))
                continue
            if isinstance(value, dict):
                for key in (repeated or {}).get(id(value), []):
                    issues.append(PlanIssue(f"{path}.{key}" if path else key, "given twice in the JSON; keep one"))
                children = [(v, f"{path}.{k}" if path else k) for k, v in value.items()]
            else:
                children = [(v, f"{path}[{i}]") for i, v in enumerate(value)]
            stack.extend((v, p, depth + 1) for v, p in reversed(children))
    return issues


def parse_json(text: str, source: str) -> dict[str, Any]:
    """The plan document of `text`, or a PlanError: not JSON, not an object, repeated keys, NaN or
    Infinity, nesting deeper than MAX_DEPTH."""
    try:
        doc, repeated = _loads(text)
    except json.JSONDecodeError as exc:
        raise PlanError(
            source, [PlanIssue("", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")]
        ) from None
    except RecursionError:
        raise PlanError(
            source, [PlanIssue("", f"the JSON nests too deeply (a plan has at most {MAX_DEPTH} levels)")]
        ) from None
    if not isinstance(doc, dict):
        raise PlanError(source, [PlanIssue("", f"a plan must be a JSON object, not {_json_type(doc)}")])
    issues = value_issues(doc, repeated)
    if issues:
        raise PlanError(source, issues)
    return doc


def expand_dotted(doc: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], list[PlanIssue]]:
    """Expand {"train.lr": 1} into {"train": {"lr": 1}} at every level except below OPAQUE_KEYS."""
    issues: list[PlanIssue] = []
    out: dict[str, Any] = {}
    # Nested keys first, so a dotted key that collides with one is reported against the dotted form.
    for key in sorted(doc, key=lambda k: "." in k):
        value = doc[key]
        parts = key.split(".")
        if any(not p for p in parts):
            issues.append(PlanIssue(prefix + key, "empty segment in dotted key"))
            continue
        target = out
        for i, part in enumerate(parts[:-1]):
            here = prefix + ".".join(parts[: i + 1])
            existing = target.setdefault(part, {})
            if not isinstance(existing, dict):
                issues.append(PlanIssue(here, f"is {_json_type(existing)}, but '{prefix + key}' sets a key inside it"))
                target = None
                break
            target = existing
        if target is None:
            continue
        leaf = parts[-1]
        path = prefix + key
        if isinstance(value, dict) and leaf not in OPAQUE_KEYS:
            value, sub = expand_dotted(value, path + ".")
            issues.extend(sub)
        if leaf in target:
            if isinstance(target[leaf], dict) and isinstance(value, dict):
                clash = set(target[leaf]) & set(value)
                if clash:
                    first = sorted(clash)[0]
                    issues.append(PlanIssue(f"{path}.{first}", "given twice (nested and as a dotted key); keep one"))
                    continue
                target[leaf].update(value)
                continue
            issues.append(PlanIssue(path, "given twice (nested and as a dotted key); keep one"))
            continue
        target[leaf] = value
    return out, issues


def parse_override(item: str) -> tuple[str, Any]:
    """Parse one `--set key=value`: the value is JSON when it parses, else the literal string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=0.001")
    try:
        value, repeated = _loads(raw)
    except json.JSONDecodeError:
        return key, raw
    except RecursionError:
        raise UsageError(f"--set {key}: the value nests too deeply (at most {MAX_DEPTH} levels)") from None
    issues = value_issues(value, repeated, key)
    if issues:
        raise UsageError(f"--set {issues[0]}")
    return key, value


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set` items in order; later ones win. Intermediate objects are created as needed."""
    for item in overrides:
        set_key(doc, *parse_override(item), flag="--set")
    return doc


def set_key(doc: dict[str, Any], key: str, value: Any, flag: str = "--set") -> None:
    """Set a dotted `key` to an already-parsed `value`, creating intermediate objects."""
    parts = key.split(".")
    target = doc
    for i, part in enumerate(parts[:-1]):
        nxt = target.setdefault(part, {})
        if not isinstance(nxt, dict):
            where = ".".join(parts[: i + 1])
            raise UsageError(f"{flag} {key}: '{where}' is {_json_type(nxt)} in the plan, not an object")
        target = nxt
    target[parts[-1]] = value


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    return "an object"
