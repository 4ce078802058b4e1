"""Loading a plan: JSON text → dotted keys expanded → `--set` overrides → typed `Plan` → semantic checks.

Every problem is collected as a `PlanIssue(path, message)` and reported together in one `PlanError`,
so a user fixes a plan in one round. Validation never needs Docker, torch or pandas: the database
checks use the standard library's sqlite3.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from runner.data.db import check_database, connect_readonly, read_layout
from runner.errors import DataError, PlanError, PlanIssue
from runner.plan.document import (
    STDIN,
    _json_type,
    apply_overrides,
    expand_dotted,
    parse_json,
    read_plan_text,
    set_key,
)
from runner.plan.issues import _issues_from_pydantic
from runner.plan.models import Plan


@dataclass(frozen=True)
class LoadedPlan:
    """A validated plan plus where it came from; `resolved` is the JSON form with defaults filled in."""

    plan: Plan
    source: str
    base_dir: Path

    @property
    def resolved(self) -> dict[str, Any]:
        return self.plan.model_dump(mode="json")


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
    plan, issues = resolve_name(plan)
    if issues:
        raise PlanError(source, issues)
    issues = semantic_issues(plan, check_db=check_db)
    if issues:
        raise PlanError(source, issues)
    return LoadedPlan(plan=plan, source=source, base_dir=base_dir)


def resolve_name(plan: Plan) -> tuple[Plan, list[PlanIssue]]:
    """The plan with the {plan.key} placeholders of its `name` filled from its own (resolved) keys.

    A value is lower-cased and every character outside [a-z0-9._-] becomes "-", so
    "{model.name}" of "MyCNN" gives "mycnn". A placeholder must name a key with a scalar value
    (string, number, boolean; null gives "none"). The filled name must be a valid experiment name.
    Filled in every run, single or swept, so a sweep point has the id the same plan has alone.
    """
    import json
    import re

    from runner.plan.models import NAME_PATTERN, PLACEHOLDER

    if "{" not in plan.name:  # still a valid experiment name? (the template pattern is looser)
        if re.fullmatch(NAME_PATTERN, plan.name):
            return plan, []
        return plan, [PlanIssue("name", f"{plan.name!r}: a name is 1-64 of a-z 0-9 . _ - (starting a-z0-9)")]
    flat = _flatten(plan.model_dump(mode="json"))
    issues: list[PlanIssue] = []

    def fill(match: re.Match) -> str:
        key = match.group(0)[1:-1]
        if key not in flat:
            issues.append(PlanIssue("name", f"placeholder {{{key}}}: no such plan key with a single value"))
            return "x"
        value = flat[key]
        text = value if isinstance(value, str) else json.dumps(value)
        return re.sub(r"[^a-z0-9._-]", "-", text.lower())

    name = re.sub(PLACEHOLDER, fill, plan.name)
    if not issues and not re.fullmatch(NAME_PATTERN, name):
        issues.append(
            PlanIssue(
                "name", f"{plan.name!r} fills to {name[:80]!r}: a name is 1-64 of a-z 0-9 . _ - (starting a-z0-9)"
            )
        )
    return plan.model_copy(update={"name": name}), issues


def _flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of the scalar values in a plan document (objects descended into, lists left out)."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{path}."))
        elif not isinstance(value, list):
            out[path] = value
    return out


def _resolve_db(plan: Plan, base_dir: Path, workdir: Path | None) -> Plan:
    db = Path(os.path.expanduser(plan.data.db))
    if not db.is_absolute():
        candidates = [base_dir / db] + ([Path(workdir) / db] if workdir else [])
        db = next((c for c in candidates if c.exists()), candidates[0])
    data = plan.data.model_copy(update={"db": str(db.resolve())})
    return plan.model_copy(update={"data": data})


# The built-in cnn cannot take covariates (the core refuses them too, for a plan it is handed directly).
CNN_WITH_COVARIATES = (
    "model 'cnn' convolves over residue positions, where covariates would be read as one more residue; "
    "use ridge, linear, mlp or ge with covariates, or drop data.covariates"
)


def semantic_issues(plan: Plan, check_db: bool = True) -> list[PlanIssue]:
    """Checks a schema cannot express: cross-field rules and the database's real contents."""
    issues: list[PlanIssue] = []
    split = plan.split
    if split.fold == "all":
        if split.strategy == "mut_num":
            issues.append(PlanIssue("split.fold", "'all' needs a k-fold strategy (random, modulo, contiguous, column)"))
        elif split.n_folds is None and split.strategy in ("random", "column"):
            issues.append(PlanIssue("split.fold", "'all' needs split.n_folds (how many folds to run)"))
    elif split.n_folds is not None and split.fold >= split.n_folds:
        issues.append(PlanIssue("split.fold", f"must be < split.n_folds ({split.n_folds}); folds count from 0"))
    elif split.n_folds is None and split.fold != 0:
        issues.append(PlanIssue("split.fold", "needs split.n_folds (k-fold cross-validation)"))
    if split.n_folds is None and split.val_fraction + split.test_fraction >= 1:
        issues.append(PlanIssue("split.val_fraction", "split.val_fraction + split.test_fraction must be < 1"))
    if split.strategy == "column" and not split.column:
        issues.append(PlanIssue("split.column", "required when split.strategy is 'column'"))
    if split.strategy != "column" and split.column:
        issues.append(
            PlanIssue("split.column", "only used with split.strategy 'column'; remove it or set the strategy")
        )
    if plan.data.covariates and plan.model.name == "cnn":
        issues.append(PlanIssue("data.covariates", CNN_WITH_COVARIATES))
    if plan.data.target == "DMS_score_bin" and plan.data.transform != "none":
        issues.append(PlanIssue("data.transform", "applies to regression only; use 'none' with target DMS_score_bin"))
    issues.extend(_size_issues(plan))
    issues.extend(_model_issues(plan))
    if check_db:
        issues.extend(_database_issues(plan))
    return issues


def _model_issues(plan: Plan) -> list[PlanIssue]:
    """The plm embedding's model must be in this node's model store (a node setting: `infra validate`,
    `infra run`, studies and queue workers each check it where they run)."""
    from runner.modelstore import plan_issue

    problem = plan_issue(plan.embeddings)
    return [PlanIssue("embeddings.params.model", problem)] if problem else []


SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}


MAX_SIZE = 2**50  # 1 PiB: the Docker engine keeps sizes as signed 64-bit byte counts
# Below this the training core cannot even import torch; the engine reads 0 as "no limit", so "0"
# would silently remove the limit the plan seems to set.
MIN_MEMORY = 64 * 2**20
MIN_SHM = 2**20  # the engine reads 0 as its 64 MiB default
MAX_SHM = 2**40  # /dev/shm is memory: 1 TiB is more than any node has


def size_bytes(text: str) -> float:
    """A `SIZE_PATTERN` size ("16g", "512m", "1.5g", "4096") in bytes, units of 1024 as Docker reads them."""
    number, unit = (text[:-1], text[-1].lower()) if text[-1].isalpha() else (text, "")
    return float(number) * SIZE_UNITS[unit]


def _size_issues(plan: Plan) -> list[PlanIssue]:
    issues = []
    res = plan.resources
    sizes = {key: size_bytes(getattr(res, key)) for key in ("shm_size", "memory") if getattr(res, key) is not None}
    for key, size in sizes.items():
        text = getattr(res, key)
        if size > MAX_SIZE:
            issues.append(PlanIssue(f"resources.{key}", f"{text!r} is larger than any machine; use e.g. '16g'"))
    memory, shm = sizes.get("memory"), sizes["shm_size"]
    if memory is not None and memory < MIN_MEMORY:
        issues.append(PlanIssue("resources.memory", f"{res.memory!r} is below 64m, too little to start the training "
                                "core (0 would mean no limit); use e.g. '16g', or leave it out for none"))  # fmt: skip
    # (shm_size above memory is allowed: the default 1g with a small memory limit is common, and what
    # /dev/shm holds is counted in the container's memory anyway)
    if shm < MIN_SHM or (shm > MAX_SHM and shm <= MAX_SIZE):
        issues.append(PlanIssue("resources.shm_size", f"{res.shm_size!r} is outside 1m to 1024g; use e.g. '1g'"))
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
            issues.extend(_covariate_issues(plan, layout, db))
            if not layout.id_is_rowid:
                issues.extend(_content_issues(conn, db, layout))
        finally:
            conn.close()
    except DataError as exc:
        issues.append(PlanIssue("data.db", exc.message))
    except sqlite3.Error as exc:
        issues.append(PlanIssue("data.db", f"{db} cannot be read: {exc}"))
    return issues


# extra columns the core's selection cannot return under their own name (runner.core.data.FRAME_NAMES)
FRAME_ONLY_NAMES = ("sequence", "source_text", "source_ref")


def _covariate_issues(plan: Plan, layout, db: Path) -> list[PlanIssue]:
    """`data.covariates` name extra columns of the mutations table (what `--extra-columns` imports);
    whether their values are numbers and present in every selected row is the core's check at start."""
    extras = {c for c in layout.extras if c not in FRAME_ONLY_NAMES}
    issues = []
    for i, column in enumerate(plan.data.covariates):
        if column in extras:
            continue
        listed = f"available: {', '.join(sorted(extras))}" if extras else "the table has no extra columns"
        if column in layout.mutation_columns or column == "mut_num":
            # no "did you mean": a standard column's name is no typo of an extra one
            why, hint = f"{column!r} is a standard column of the mutations table, not a covariate", listed
        else:
            why = f"no column {column!r} in the mutations table of {db.name}"
            hint = _suggest(column, extras) if extras else listed
        issues.append(
            PlanIssue(
                f"data.covariates[{i}]",
                f"{why}; {hint} (covariates are extra numeric columns: import them with "
                "'infra data import --extra-columns')",
            )
        )
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
