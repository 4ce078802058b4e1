"""`infra config get|set|unset|list`: node settings stored in the config file (the environment overrides)."""

from typing import Annotated

import typer

from runner.cli.options import JSON_OPT
from runner.cli.output import echo, emit_json, say

app = typer.Typer(
    help="Node settings (base image, torch spec, limits, tracking servers) stored in the node's config file.\n\n"
    "An INFRA_* environment variable overrides the stored value. Example: infra config set base_os infra-os:bookworm",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _complete_key(incomplete: str) -> list[str]:
    from runner.settings import KEYS

    return [k for k in KEYS if k.startswith(incomplete)]


KEY_ARG = Annotated[
    str,
    typer.Argument(
        help="A setting (see 'infra config list'), or its INFRA_* variable name.", autocompletion=_complete_key
    ),
]


def _row(key: str) -> dict:
    from runner.settings import describe_settings, setting_name

    name = setting_name(key)
    return next(r for r in describe_settings() if r["key"] == name)


@app.command("get")
def get(key: KEY_ARG, json_out: JSON_OPT = False) -> None:
    """Print the value in force (nothing for an unset text setting); its source goes to stderr.

    Example: infra config get torch_spec
    """
    row = _row(key)
    if json_out:
        emit_json(row)
        return
    if row["value"] not in (None, ()):
        echo(_text(row["value"]))
    say(f"{row['key']}: from {_source(row)}")


@app.command("set")
def set_(
    key: KEY_ARG,
    value: Annotated[str, typer.Argument(help="The value: text, a path, a whole number or a size like 100M.")],
    json_out: JSON_OPT = False,
) -> None:
    """Validate VALUE and store it in the config file (written atomically, under a lock).

    Example: infra config set log_limit_bytes 200M
    """
    from runner.settings import KEYS, config_file, set_setting

    name, stored = set_setting(key, value)
    if json_out:
        emit_json({"key": name, "value": stored, "config_file": str(config_file())})
    say(f"{name} = {_text(stored)} stored in {config_file()}")
    _warn_env(KEYS[name].env)


@app.command("unset")
def unset(key: KEY_ARG, json_out: JSON_OPT = False) -> None:
    """Remove a setting from the config file (the default applies again unless the environment sets it).

    Example: infra config unset base_image
    """
    from runner.settings import KEYS, config_file, unset_setting

    name, had = unset_setting(key)
    if json_out:
        emit_json({"key": name, "removed": had, "config_file": str(config_file())})
    say(f"{name} removed from {config_file()}" if had else f"{name} was not stored in {config_file()}")
    _warn_env(KEYS[name].env)


@app.command("list")
def list_(json_out: JSON_OPT = False) -> None:
    """Every node setting: its value in force, where it comes from (env, config or default), its variable.

    The environment overrides the config file; a row whose environment variable hides a stored
    value says so. With --json: {"config_file": ..., "settings": [{key, env, value, source, stored, help}]}.

    Example: infra config list
    """
    from runner.settings import config_file, describe_settings

    rows = describe_settings()
    if json_out:
        emit_json({"config_file": str(config_file()), "settings": rows})
        return
    table = [("KEY", "VALUE", "SOURCE", "ENV")]
    table += [(r["key"], _text(r["value"]) or "-", _source(r), r["env"]) for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(3)]
    for t in table:
        echo(f"{t[0]:{widths[0]}}  {t[1]:{widths[1]}}  {t[2]:{widths[2]}}  {t[3]}")
    say(f"config file: {config_file()} (INFRA_* environment variables override it)")


def _text(value) -> str:
    """A setting's value as `infra config set` takes it: a list of hosts comma-joined, nothing for none."""
    if value is None:
        return ""
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _source(row: dict) -> str:
    if row["source"] == "env" and row["stored"] is not None:
        return f"env (overrides config {_text(row['stored'])})"
    return row["source"]


def _warn_env(var: str) -> None:
    import os

    if os.environ.get(var):
        say(f"note: {var} is set in this environment and takes precedence")
