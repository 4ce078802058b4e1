"""The published plan schema (`schemas/plan.schema.json`), generated from the pydantic models.

`python -m runner.schema` rewrites the file; a test fails when the file is stale, so the two can
never disagree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from runner.plan_models import Plan

SCHEMA_ID = "https://infra.dev/schemas/plan.schema.json"
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "plan.schema.json"


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


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> int:
    SCHEMA_PATH.parent.mkdir(parents=True, exist_ok=True)
    SCHEMA_PATH.write_text(render(plan_schema()), encoding="utf-8")
    print(f"wrote {SCHEMA_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
