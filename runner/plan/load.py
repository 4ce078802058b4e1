"""Loading a plan: JSON text → dotted keys expanded → `--set` overrides → typed `Plan` → semantic checks.

Every problem is collected as a `PlanIssue(path, message)` and reported together in one `PlanError`,
so a user fixes a plan in one round. Validation never needs Docker, torch or pandas: the database
checks use the standard library's sqlite3.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from runner.data.db import check_database, connect_readonly, read_layout
from runner.errors import DataError, PlanError, PlanIssue, UsageError
from runner.plan.models import (
    GPU_LIST_PATTERN,
    IDENTIFIER_PATTERN,
    NAME_PATTERN,
    REGISTRY_NAME_PATTERN,
    SIZE_PATTERN,
    Plan,
)

STDIN = "-"
# Below these keys the user's dictionaries are passed to factories as they are: no dotted expansion.
OPAQUE_KEYS = {"params"}
UNION_MESSAGES = {
    "data.dataset": "must be a dataset name or a list of dataset names",
    "resources.gpus": 'must be "all", "none", a GPU count or a device list like "0,2"',
    "train.devices": 'must be a positive integer or "auto"',
}

PATTERN_RULES = {
    NAME_PATTERN: "use 1-64 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit",
    IDENTIFIER_PATTERN: "must be a column name (letters, digits, '_'; not starting with a digit)",
    REGISTRY_NAME_PATTERN: "must be a registered name (letters, digits, '.', '_', '-'; 1-64 characters)",
    GPU_LIST_PATTERN: 'must be "all", "none", a GPU count or a device list like "0,2"',
    SIZE_PATTERN: "must be a size like '512m' or '2g'",
}


@dataclass(frozen=True)
class LoadedPlan:
    """A validated plan plus where it came from; `resolved` is the JSON form with defaults filled in."""

    plan: Plan
    source: str
    base_dir: Path

    @property
    def resolved(self) -> dict[str, Any]:
        return self.plan.model_dump(mode="json")


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


def load_plan(
    source: str,
    overrides: list[str] | None = None,
    workdir: Path | None = None,
    check_db: bool = True,
    text: str | None = None,
) -> LoadedPlan:
    """Read, expand, override, validate and semantically check a plan; raise PlanError with every issue.

    `text` replaces reading `source` (used when stdin was already read). Relative `data.db` resolves
    against the plan file's folder (the current directory for stdin), then `workdir`.
    """
    if text is None:
        text, name, base_dir = read_plan_text(source)
    else:
        name, base_dir = ("<stdin>", Path.cwd()) if source == STDIN else (source, Path(source).resolve().parent)
    return load_plan_document(
        parse_json(text, name), name, workdir, base_dir=base_dir, overrides=overrides or [], check_db=check_db
    )


def load_plan_document(
    doc: dict[str, Any],
    source: str,
    workdir: Path | None = None,
    *,
    base_dir: Path | None = None,
    overrides: list[str] = (),
    values: dict[str, Any] | None = None,
    check_db: bool = True,
) -> LoadedPlan:
    """Validate an already-parsed plan document (a sweep point, a queued job) the way `load_plan` does.

    `overrides` are `--set` strings; `values` are already-parsed `{dotted key: value}` (a sweep's
    point) and apply last. `doc` is not modified. A relative `data.db` resolves against `base_dir`
    (default: `workdir`, else the current directory), then `workdir`.
    """
    import copy

    base_dir = base_dir or (Path(workdir) if workdir is not None else Path.cwd())
    if not isinstance(doc, dict):
        raise PlanError(source, [PlanIssue("", f"a plan must be a JSON object, not {_json_type(doc)}")])
    doc, issues = expand_dotted(copy.deepcopy(doc))
    if issues:
        raise PlanError(source, issues)
    doc = apply_overrides(doc, list(overrides))
    for key, value in (values or {}).items():
        set_key(doc, key, copy.deepcopy(value), flag="--sweep")
    doc, issues = expand_dotted(doc)
    if issues:
        raise PlanError(source, issues)
    try:
        plan = Plan.model_validate(doc)
    except ValidationError as exc:
        raise PlanError(source, _issues_from_pydantic(exc)) from None
    plan = _resolve_db(plan, base_dir, workdir)
    issues = semantic_issues(plan, check_db=check_db)
    if issues:
        raise PlanError(source, issues)
    return LoadedPlan(plan=plan, source=source, base_dir=base_dir)


def _resolve_db(plan: Plan, base_dir: Path, workdir: Path | None) -> Plan:
    db = Path(os.path.expanduser(plan.data.db))
    if not db.is_absolute():
        candidates = [base_dir / db] + ([Path(workdir) / db] if workdir else [])
        db = next((c for c in candidates if c.exists()), candidates[0])
    data = plan.data.model_copy(update={"db": str(db.resolve())})
    return plan.model_copy(update={"data": data})


def semantic_issues(plan: Plan, check_db: bool = True) -> list[PlanIssue]:
    """Checks a schema cannot express: cross-field rules and the database's real contents."""
    issues: list[PlanIssue] = []
    split = plan.split
    if split.n_folds is not None and split.fold >= split.n_folds:
        issues.append(PlanIssue("split.fold", f"must be < split.n_folds ({split.n_folds}); folds count from 0"))
    if split.n_folds is None and split.fold != 0:
        issues.append(PlanIssue("split.fold", "needs split.n_folds (k-fold cross-validation)"))
    if split.n_folds is None and split.val_fraction + split.test_fraction >= 1:
        issues.append(PlanIssue("split.val_fraction", "split.val_fraction + split.test_fraction must be < 1"))
    if split.strategy == "column" and not split.column:
        issues.append(PlanIssue("split.column", "required when split.strategy is 'column'"))
    if split.strategy != "column" and split.column:
        issues.append(
            PlanIssue("split.column", "only used with split.strategy 'column'; remove it or set the strategy")
        )
    if plan.data.target == "DMS_score_bin" and plan.data.transform != "none":
        issues.append(PlanIssue("data.transform", "applies to regression only; use 'none' with target DMS_score_bin"))
    issues.extend(_where_shape_issues(plan))
    issues.extend(_size_issues(plan))
    if check_db:
        issues.extend(_database_issues(plan))
    return issues


def _where_shape_issues(plan: Plan) -> list[PlanIssue]:
    issues = []
    for i, clause in enumerate(plan.data.where):
        path, op, value = f"data.where[{i}].value", clause.op, clause.value
        if op in ("is_null", "not_null"):
            if value is not None:
                issues.append(PlanIssue(path, f"must be absent for op '{op}'"))
        elif op in ("in", "not_in"):
            if not isinstance(value, list) or not value or not all(_is_scalar(v) for v in value):
                issues.append(PlanIssue(path, f"must be a non-empty list of scalars for op '{op}'"))
        elif op == "between":
            if not isinstance(value, list) or len(value) != 2 or not all(_is_scalar(v) for v in value):
                issues.append(PlanIssue(path, "must be [low, high] for op 'between'"))
        elif not _is_scalar(value):
            issues.append(PlanIssue(path, f"must be a string, number or boolean for op '{op}'"))
            continue
        numbers = value if isinstance(value, list) else [value]
        if any(isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**63 for v in numbers):
            issues.append(PlanIssue(path, "integers must lie within ±9223372036854775807 (SQLite's range)"))
    return issues


SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}
MAX_SIZE = 2**50  # 1 PiB: the Docker engine keeps sizes as signed 64-bit byte counts


def _size_issues(plan: Plan) -> list[PlanIssue]:
    issues = []
    for key in ("shm_size", "memory"):
        text = getattr(plan.resources, key)
        if text is None:
            continue
        number, unit = (text[:-1], text[-1].lower()) if text[-1].isalpha() else (text, "")
        if float(number) * SIZE_UNITS[unit] > MAX_SIZE:
            issues.append(PlanIssue(f"resources.{key}", f"{text!r} is larger than any machine; use e.g. '16g'"))
    return issues


def _database_issues(plan: Plan) -> list[PlanIssue]:
    """What the core will need from the database, checked the way the core reads it (read_layout)."""
    db = Path(plan.data.db)
    problem = check_database(db)
    if problem:
        return [PlanIssue("data.db", problem)]
    issues = []
    try:
        conn = connect_readonly(db)
        try:
            layout = read_layout(conn, str(db))
            columns = set(layout.filter_columns)
            for i, clause in enumerate(plan.data.where):
                if clause.column not in columns:
                    issues.append(
                        PlanIssue(
                            f"data.where[{i}].column",
                            f"no column {clause.column!r} in {db.name}; {_suggest(clause.column, columns)}",
                        )
                    )
            if plan.data.target == "DMS_score_bin" and not layout.has_bin:
                issues.append(PlanIssue("data.target", f"{db.name} has no DMS_score_bin column; use DMS_score"))
            wanted = [plan.data.dataset] if isinstance(plan.data.dataset, str) else list(plan.data.dataset or [])
            if wanted:
                known = {row[0] for row in conn.execute("SELECT source_text FROM sources")}
                for name in wanted:
                    if name not in known:
                        issues.append(
                            PlanIssue("data.dataset", f"no dataset {name!r} in {db.name}; {_suggest(name, known)}")
                        )
            if plan.split.column and plan.split.column not in layout.mutation_columns:
                mutation_columns = set(layout.mutation_columns)
                issues.append(
                    PlanIssue(
                        "split.column",
                        f"no column {plan.split.column!r} in the mutations table of {db.name}; "
                        f"{_suggest(plan.split.column, mutation_columns)}",
                    )
                )
            if not layout.id_is_rowid:
                issues.extend(_content_issues(conn, db, layout))
        finally:
            conn.close()
    except DataError as exc:
        issues.append(PlanIssue("data.db", exc.message))
    except sqlite3.Error as exc:
        issues.append(PlanIssue("data.db", f"{db} cannot be read: {exc}"))
    return issues


def _content_issues(conn: sqlite3.Connection, db: Path, layout) -> list[PlanIssue]:
    """Checks of a database not written by infra (its `id` is untyped): ids, scores and references.

    infra's own databases get these guarantees from their DDL and the importer; the lab's layout
    declares no types, so one scan checks what the core would otherwise fail on at start.
    """
    key = f'"{layout.source_key}"'
    bin_check = "sum(typeof(DMS_score_bin) NOT IN ('integer', 'real', 'null'))" if layout.has_bin else "0"
    bad_id, bad_score, bad_bin, orphans = conn.execute(
        "SELECT sum(typeof(id) != 'integer'), sum(typeof(DMS_score) NOT IN ('integer', 'real', 'null')), "
        f"{bin_check}, sum({key} IS NULL OR {key} NOT IN (SELECT id FROM sources)) FROM mutations"
    ).fetchone()
    issues = []
    if bad_id:
        issues.append(
            PlanIssue("data.db", f"{db.name}: {bad_id} mutations row(s) have no integer id; give every row one")
        )
    else:
        dup = conn.execute("SELECT id FROM mutations GROUP BY id HAVING count(*) > 1 LIMIT 1").fetchone()
        if dup:
            issues.append(PlanIssue("data.db", f"{db.name}: mutations.id {dup[0]} is used by more than one row"))
    for column, count in (("DMS_score", bad_score), ("DMS_score_bin", bad_bin)):
        if count:
            issues.append(
                PlanIssue(
                    "data.db", f"{db.name}: {count} value(s) of mutations.{column} are not numbers (text or blobs)"
                )
            )
    if orphans:
        issues.append(
            PlanIssue(
                "data.db",
                f"{db.name}: {orphans} mutations row(s) refer to no row of sources (mutations.{layout.source_key})",
            )
        )
    return issues


def _suggest(word: str, options: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, sorted(options), n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    listed = ", ".join(sorted(options)[:12])
    return f"available: {listed}" if listed else "the table is empty"


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


# --- pydantic errors → PlanIssue ---------------------------------------------------------------


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside an annotation (X, list[X], X | None, Annotated[X, ...]) if any."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _model_in(typing.get_args(annotation)[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if origin in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found:
                return found
    return None


def _clean_loc(loc: tuple) -> tuple[str, type[BaseModel] | None, str | None]:
    """Turn a pydantic loc into 'a.b[0].c', dropping union-member tags; also return the model at the end."""
    model: type[BaseModel] | None = Plan
    path = ""
    last_field = None
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
            continue
        if model is not None and item in model.model_fields:
            path = f"{path}.{item}" if path else item
            last_field = item
            model = _model_in(model.model_fields[item].annotation)
        elif model is None and last_field in OPAQUE_KEYS:
            path = f"{path}.{item}"
        # anything else is a union tag such as 'constrained-str' or 'list[...]'
    return path, model, last_field


def _issues_from_pydantic(exc: ValidationError) -> list[PlanIssue]:
    issues: list[PlanIssue] = []
    seen: set[str] = set()
    for err in exc.errors(include_url=False):
        loc = err["loc"]
        if err["type"] == "extra_forbidden":
            import difflib

            parent_path, parent_model, _ = _clean_loc(loc[:-1])
            key = str(loc[-1])
            path = f"{parent_path}.{key}" if parent_path else key
            allowed = sorted(parent_model.model_fields) if parent_model else []
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(allowed)}"
            issue = PlanIssue(path, f"unknown key; {hint}")
        else:
            path, _, _ = _clean_loc(loc)
            union = next((u for u in UNION_MESSAGES if path == u or path.startswith((u + "[", u + "."))), None)
            issue = PlanIssue(union, UNION_MESSAGES[union]) if union else PlanIssue(path, _message(err))
        if str(issue) not in seen:
            seen.add(str(issue))
            issues.append(issue)
    return issues


def _message(err: dict) -> str:
    kind, ctx, value = err["type"], err.get("ctx", {}), err.get("input")
    simple = {
        "missing": "required key is missing",
        "string_type": "must be a string",
        "int_type": "must be an integer",
        "int_parsing": "must be an integer",
        "int_from_float": "must be an integer",
        "float_type": "must be a number",
        "float_parsing": "must be a number",
        "bool_type": "must be true or false",
        "bool_parsing": "must be true or false",
        "dict_type": "must be an object",
        "model_type": "must be an object",
        "model_attributes_type": "must be an object",
        "list_type": "must be a list",
        "finite_number": "must be a finite number",
    }
    if kind in simple:
        return simple[kind]
    bounds = {
        "greater_than": (">", "gt"),
        "greater_than_equal": (">=", "ge"),
        "less_than": ("<", "lt"),
        "less_than_equal": ("<=", "le"),
    }
    if kind in bounds:
        symbol, key = bounds[kind]
        limit = ctx[key]
        return f"must be {symbol} {limit if isinstance(limit, int) else format(limit, 'g')}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters"
    if kind == "too_short":
        return f"must have at least {ctx['min_length']} item(s)"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}"
    if kind == "string_pattern_mismatch":
        rule = PATTERN_RULES.get(ctx["pattern"], f"must match {ctx['pattern']}")
        return f"{value!r} is not allowed: {rule}"
    return err["msg"]
