"""From a plan document to a typed `Plan`: pydantic's validation errors as `PlanIssue`s that name the
key path and say what to do. Used by the host's loader and by the training core reading its
`config/plan.json`.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from runner.errors import PlanError, PlanIssue
from runner.plan.document import OPAQUE_KEYS, expand_dotted
from runner.plan.models import (
    GPU_LIST_PATTERN,
    IDENTIFIER_PATTERN,
    MLFLOW_URI_PATTERN,
    NAME_PATTERN,
    NAME_TEMPLATE_PATTERN,
    REGISTRY_NAME_PATTERN,
    SIZE_PATTERN,
    Plan,
)

UNION_MESSAGES = {
    "data.dataset": "must be a dataset name or a list of dataset names",
    "resources.gpus": 'must be "all", "none", a GPU count or a device list like "0,2"',
    "train.devices": 'must be a positive integer or "auto"',
}

PATTERN_RULES = {
    NAME_PATTERN: "use 1-64 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit",
    NAME_TEMPLATE_PATTERN: "use 1-64 lowercase letters, digits, '.', '_' or '-' (starting with a letter or digit), "
    "and {plan.key} placeholders such as {model.name}",
    IDENTIFIER_PATTERN: "must be a column name (letters, digits, '_'; not starting with a digit)",
    REGISTRY_NAME_PATTERN: "must be a registered name (letters, digits, '.', '_', '-'; 1-64 characters)",
    GPU_LIST_PATTERN: 'must be "all", "none", a GPU count or a device list like "0,2"',
    SIZE_PATTERN: "must be a size like '512m' or '2g'",
    MLFLOW_URI_PATTERN: "use http(s)://host[:port][/path] without user, password, query or fragment; "
    "credentials go in the host's MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN",
}
# values not echoed in messages: a tracking URI may carry a password
UNECHOED_PATTERNS = {MLFLOW_URI_PATTERN}


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
        return f"not allowed: {rule}" if ctx["pattern"] in UNECHOED_PATTERNS else f"{value!r} is not allowed: {rule}"
    return err["msg"]


def plan_from_document(doc: dict[str, Any], source: str) -> Plan:
    """Expand dotted keys and validate `doc` as a `Plan`; a PlanError lists every problem."""
    doc, found = expand_dotted(doc)
    if found:
        raise PlanError(source, found)
    try:
        return Plan.model_validate(doc)
    except ValidationError as exc:
        raise PlanError(source, _issues_from_pydantic(exc)) from None
