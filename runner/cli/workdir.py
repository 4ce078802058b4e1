"""`infra workdir get|set|clear`: the node-local workdir setting."""

import os
from pathlib import Path
from typing import Annotated

import typer

from runner.cli.options import JSON_OPT
from runner.cli.output import echo, emit_json, say

app = typer.Typer(
    help="Show or change the node's workdir (INFRA_WORKDIR overrides the stored setting).",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@app.command("get")
def get(json_out: JSON_OPT = False) -> None:
    """Print the effective workdir; exit 2 with a hint when none is set.

    Example: infra workdir get
    """
    from runner.workdir.store import get_workdir

    path = get_workdir(required=True)
    if json_out:
        emit_json({"workdir": str(path)})
    else:
        echo(str(path))


@app.command("set")
def set_(path: Annotated[str, typer.Argument(help="An existing directory.")], json_out: JSON_OPT = False) -> None:
    """Store PATH as this node's workdir.

    Example: infra workdir set ~/protein-work
    """
    from runner.workdir.store import ENV_VAR, set_workdir

    stored = set_workdir(path)
    if json_out:
        emit_json({"workdir": str(stored)})
    say(f"workdir set to {stored}")
    if os.environ.get(ENV_VAR):
        say(f"note: {ENV_VAR} is set in this environment and takes precedence")


@app.command("clear")
def clear(json_out: JSON_OPT = False) -> None:
    """Forget the stored workdir.

    Example: infra workdir clear
    """
    from runner.workdir.store import clear_workdir

    had = clear_workdir()
    if json_out:
        emit_json({"cleared": had})
    say("workdir cleared" if had else "no workdir was stored")


def init(
    directory: Annotated[Path, typer.Argument(help="Directory to create (must be empty or absent).")],
    force: Annotated[
        bool,
        typer.Option("--force", help="Add missing template files to a non-empty directory; existing files are kept."),
    ] = False,
    set_default: Annotated[bool, typer.Option("--set-workdir", help="Also make it this node's workdir.")] = False,
    json_out: JSON_OPT = False,
) -> None:
    """Create a new workdir from plugins_template/ (example plugins, plans, README).

    Example: infra init ~/protein-work --set-workdir
    """
    from runner.workdir.store import set_workdir
    from runner.workdir.template import init_workdir

    created = init_workdir(directory, force=force)
    if set_default:
        set_workdir(directory)
    if json_out:
        emit_json({"workdir": str(directory.resolve()), "created": created})
    say(f"workdir {directory} ready ({len(created)} files); next: infra data demo --db {directory}/data/blat_ecolx.db")
    if not set_default:  # without it, `infra run` from inside the folder still asks which workdir
        say(
            f"commands use it with --workdir {directory}, INFRA_WORKDIR={directory}, or after 'infra workdir set {directory}'"
        )
