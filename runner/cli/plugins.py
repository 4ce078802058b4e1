"""`infra plugins list` and `infra plugins check`: what the workdir registers, read out of process."""

from pathlib import Path

import typer

from runner.cli import options
from runner.cli.options import BACKEND_OPT, JSON_OPT, WORKDIR_OPT, resolve_workdir
from runner.cli.output import echo, emit_json, say
from runner.run.backends import BackendName

app = typer.Typer(
    help="What the workdir's plugins register, discovered inside the plugin image (never imported here).\n\n"
    "Example: infra plugins list --json",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _discover(workdir: Path | None, backend: BackendName, quiet: bool):
    from runner.workdir.plugins import discover

    wd = resolve_workdir(workdir)
    return wd, discover(wd, options.backend(backend), on_log=None if quiet else _build_line)


def _build_line(line: str) -> None:
    if line.startswith("Successfully tagged"):  # the full build log is noise for a listing
        say(line)


@app.command("list")
def list_(json_out: JSON_OPT = False, backend: BACKEND_OPT = BackendName.docker, workdir: WORKDIR_OPT = None) -> None:
    """List every registered vocab, embedding, model, metric and split: kind, name, source file.

    Built-ins are included (`builtin: true`); plugin source files are the workdir's files. A plugin
    that fails to load makes this exit 1 with its file and line, like `infra plugins check`.

    Example: infra plugins list --json --workdir ~/protein-work
    """
    from runner.workdir.plugins import table

    wd, found = _discover(workdir, backend, json_out)
    if json_out:
        emit_json(found.components)
        return
    echo(table(found.components, wd))
    where = f"image {found.image}" if found.image else "a local subprocess"
    say(f"{len(found.plugins())} plugin component(s) from {wd}, discovered in {where}")


@app.command("check")
def check(json_out: JSON_OPT = False, backend: BACKEND_OPT = BackendName.docker, workdir: WORKDIR_OPT = None) -> None:
    """Load every plugin as a run would; exit 0 when all load, 1 naming the file, line and error otherwise.

    Messages: `plugin FILE:LINE: SyntaxError: <detail>; fix the file and run again`, and for a name
    registered twice `plugin FILE:LINE: RegistryError: model 'linear' is registered twice: by ... and
    by ...; rename one of them; fix the file and run again`.

    Example: infra plugins check --backend local
    """
    from runner.workdir.plugins import PluginLoadError

    try:
        wd, found = _discover(workdir, backend, json_out)
    except PluginLoadError as exc:
        if not json_out:
            raise
        emit_json({"ok": False, **exc.to_dict()})
        say(f"infra: error: {exc.message}")
        raise typer.Exit(exc.exit_code) from None
    plugins = found.plugins()
    if json_out:
        emit_json({"ok": True, "workdir": str(wd), "image": found.image, "plugins": plugins})
    say(
        f"ok: {len(plugins)} plugin component(s) in {wd} load "
        f"({', '.join(sorted({p['kind'] + ' ' + p['name'] for p in plugins})) or 'none'})"
    )
