"""`infra validate` and `infra schema`."""

from typing import Annotated

import typer

from runner.cli.options import JSON_OPT
from runner.cli.output import emit_json, say

SET_OPT = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a plan key: KEY=VALUE (VALUE parsed as JSON, else a string). Repeatable."),
]


def validate(
    plan: Annotated[str, typer.Argument(help="Plan JSON file, or '-' to read it from stdin.")],
    overrides: SET_OPT = None,
    json_out: JSON_OPT = False,
) -> None:
    """Check a plan against the schema and the database it names; exit 0 when valid, 2 when not.

    Every problem is reported at once, each naming its key path.

    Example: infra validate plan.json --set train.lr=0.01
    """
    from runner.plan.load import load_plan
    from runner.workdir.store import get_workdir

    loaded = load_plan(plan, overrides or [], workdir=get_workdir(required=False))
    if json_out:
        emit_json({"valid": True, "source": loaded.source, "errors": [], "plan": loaded.resolved})
    say(f"{loaded.source}: valid (name {loaded.plan.name}, model {loaded.plan.model.name}, db {loaded.plan.data.db})")


def schema() -> None:
    """Print the published plan JSON Schema (2020-12) on stdout.

    Example: infra schema > plan.schema.json
    """
    from runner.plan.schema import plan_schema, render

    typer.echo(render(plan_schema()), nl=False)
