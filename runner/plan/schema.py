"""The published plan schema (`schemas/plan.schema.json`), generated from the pydantic models.

`python -m runner.plan.schema` rewrites the file; a test fails when the file is stale, so the two can
never disagree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from runner.plan.models import Plan

SCHEMA_ID = "https://infra.dev/schemas/plan.schema.json"
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "plan.schema.json"


def plan_schema() -> dict:
    """The plan's JSON Schema (2020-12) as a dict."""
    body = Plan.model_json_schema()
    doc = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "infra plan",
        "description": "One infra experiment plan (DESIGN §3). Dotted keys are expanded before validation.",
    }
    doc.update({k: v for k, v in body.items() if k not in ("title", "description")})
    return doc


def plan_keys_table() -> str:
    """A Markdown table of every plan key with its type, default and description (docs/plans.md)."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    rows = ["| key | default | description |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            sub = _model_of(field.annotation)
            if sub is not None:
                walk(sub, f"{key}.")
                continue
            if field.is_required():
                default = "required"
            elif field.default_factory is not None:
                default = f"`{json.dumps(field.default_factory())}`"
            elif field.default is PydanticUndefined:
                default = ""
            else:
                default = f"`{json.dumps(field.default)}`"
            desc = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{key}` | {default} | {desc} |")

    walk(Plan, "")
    return "\n".join(rows) + "\n"


def _model_of(annotation):
    """The model of a nested section, also when it is optional (`TrackingSpec | None`)."""
    import types
    import typing

    from pydantic import BaseModel

    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    for candidate in (annotation, *(typing.get_args(annotation) if optional else ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


DOCS_PATH = SCHEMA_PATH.parent.parent / "docs" / "plans.md"


def main() -> int:
    """Rewrite schemas/plan.schema.json and the key table in docs/plans.md from the models."""
    SCHEMA_PATH.parent.mkdir(parents=True, exist_ok=True)
    SCHEMA_PATH.write_text(render(plan_schema()), encoding="utf-8")
    text = DOCS_PATH.read_text(encoding="utf-8")
    start = text.index("-->\n", text.index("<!-- keys:start")) + 4
    end = text.index("<!-- keys:end -->")
    DOCS_PATH.write_text(text[:start] + plan_keys_table() + text[end:], encoding="utf-8")
    print(f"wrote {SCHEMA_PATH} and the key table of {DOCS_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
