"""The `infra` command line: a thin typer layer over the library modules.

Each command group lives in its own module and imports its library lazily, so `infra --help` stays
fast and never imports torch, pandas or the Docker SDK. `main()` is the one error boundary: it turns
the `InfraError` family into one-line messages (or a JSON error document with `--json`) and the exit
codes of DESIGN §5; tracebacks only with `--debug`.
"""

import importlib
import logging
import os
import sys
from typing import Annotated

import typer

from runner import __version__

# pydantic scans every installed distribution's entry points for plugins on first use (~10 ms of
# each start); the host CLI uses none. Set before pydantic is imported; a caller's value wins.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
from runner.cli import compare as _compare
from runner.cli import config as _config
from runner.cli import data as _data
from runner.cli import experiments as _experiments
from runner.cli import housekeeping as _housekeeping
from runner.cli import models as _models
from runner.cli import plugins as _plugins
from runner.cli import predict as _predict
from runner.cli import queue as _queue
from runner.cli import run as _run
from runner.cli import validate as _validate
from runner.cli import workdir as _workdir

app = typer.Typer(
    name="infra",
    help="Validate protein-fitness experiment plans and run them in containers.\n\nExample: infra run plan.json --gpus all",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: rich formatting costs ~0.1 s of start-up
    context_settings={"help_option_names": ["-h", "--help"]},
)


class _State:
    debug = False


def _version(value: bool) -> None:
    if value:
        typer.echo(f"infra {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More log output (-v info, -vv debug).")
    ] = 0,
) -> None:
    """Validate protein-fitness experiment plans and run them in containers."""
    _State.debug = debug
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    from runner.cli.output import SafeLogFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeLogFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


app.command("validate")(_validate.validate)
app.command("run")(_run.run)
app.command("build")(_run.build)
app.command("status")(_experiments.status)
app.command("logs")(_experiments.logs)
app.command("stop")(_experiments.stop)
app.command("ls")(_experiments.ls)
app.command("track")(_experiments.track)
app.command("compare")(_compare.compare)
app.command("predict")(_predict.predict)
app.command("schema")(_validate.schema)
app.command("init")(_workdir.init)
app.add_typer(_workdir.app, name="workdir")
app.add_typer(_data.app, name="data")
app.add_typer(_plugins.app, name="plugins")
app.add_typer(_models.app, name="models")
app.command("submit")(_queue.submit)
app.command("worker")(_queue.worker)
app.add_typer(_queue.queue_app, name="queue")
app.command("node")(_queue.node)
app.command("rm")(_housekeeping.rm)
app.command("prune")(_housekeeping.prune)
app.add_typer(_config.app, name="config")


def _click_module():
    """The click that typer runs on: typer >= 0.29 vendors it as `typer._click`, older releases use `click`."""
    base = next(
        c
        for c in typer.Context.__mro__
        if c.__name__ == "Context" and c.__module__.startswith(("click", "typer._click"))
    )
    return importlib.import_module(base.__module__.rsplit(".", 1)[0])


def report(exc: Exception, argv: list[str], prog: str = "infra") -> int:
    """The one error boundary's output: one line per problem on stderr, and with `--json` exactly one
    JSON error document on stdout (with `--events`, a final `result` event); returns the exit code."""
    from runner.cli.output import emit_event, emit_json, say
    from runner.errors import InfraError, PlanError

    assert isinstance(exc, InfraError)
    if "--events" in argv:
        emit_event({"event": "result", **exc.to_json()})
    elif "--json" in argv:
        emit_json(exc.to_json())
    if isinstance(exc, PlanError):
        for issue in exc.issues:
            say(f"{prog}: error: {exc.source}: {issue}")
    else:
        say(f"{prog}: error: {exc.message}")
    tail = getattr(exc, "log_tail", "")
    if tail and "--json" not in argv and "--events" not in argv:
        say(tail.rstrip())
    return exc.exit_code


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `infra` console script."""
    from runner.errors import EXIT_INTERRUPTED, EXIT_USAGE, InfraError

    click = _click_module()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = app(args=args, prog_name="infra", standalone_mode=False)
    except InfraError as exc:
        if _State.debug:
            import traceback

            traceback.print_exc()
        code = report(exc, args)
    except click.exceptions.UsageError as exc:
        if "--json" in args or "--events" in args:
            from runner.errors import UsageError

            where = exc.ctx.command_path if exc.ctx is not None else "infra"
            code = report(UsageError(f"{where}: {exc.format_message()} (see '{where} --help')"), args)
        else:
            exc.show()
            code = EXIT_USAGE
    except (typer.Abort, KeyboardInterrupt):
        print("infra: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except click.exceptions.ClickException as exc:
        exc.show()
        code = exc.exit_code
    sys.exit(code if isinstance(code, int) else 0)
