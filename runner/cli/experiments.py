"""`infra status`, `infra logs`, `infra stop`, `infra ls`: experiments as the engine really sees them."""

import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from runner.cli.options import JSON_OPT, WORKDIR_OPT, resolve_workdir
from runner.cli.output import emit_json, say
from runner.lines import terminal_safe

ID_ARG = Annotated[str, typer.Argument(help="Experiment id (from 'infra run' or 'infra ls').")]
STATUS_KEYS = (
    "experiment_id",
    "name",
    "state",
    "attempt",
    "backend",
    "exp_dir",
    "image",
    "image_id",
    "container_id",
    "pid",
    "exit_code",
    "message",
    "host",
    "created_at",
    "started_at",
    "finished_at",
    "updated_at",
)


MAIN_METRIC = ("test", "spearman")
ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*)?(?:Error|Exception|Interrupt|Exit)\b.*$")
ERROR_TAIL_LINES = 60


def status_document(record: dict) -> dict:
    doc = {k: record.get(k) for k in STATUS_KEYS}
    doc["verified"] = record.get("verified", True)
    if record.get("state") == "succeeded":
        from runner.run.records import metrics_summary

        doc.update(metrics_summary(Path(record["exp_dir"])))
    return doc


def error_reason(log_tail: str) -> str | None:
    """The training's own account of a failure (pure): its last `infra-train: error: …` line, else
    the last line that looks like an exception (`ValueError: …`), from the end of its log."""
    from runner.run.jobs import core_error

    reason = core_error("train", log_tail)
    if reason:
        return reason[:500]
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    for line in reversed(lines):
        if ERROR_LINE.match(line):
            return line[:500]
    return None


def failure(record: dict) -> dict | None:
    """{"message": the record's message, "reason": the core's error line, "log": the log path} of a
    failed or lost experiment, else None."""
    if record.get("state") not in ("failed", "lost") or not record.get("exp_dir"):
        return None
    from runner.run.logs import tail_text
    from runner.run.records import Experiment

    exp = Experiment(Path(record["exp_dir"]))
    return {
        "message": record.get("message"),
        "reason": error_reason(tail_text(exp, ERROR_TAIL_LINES)),
        "log": str(exp.container_log),
    }


def status(experiment_id: ID_ARG, json_out: JSON_OPT = False, workdir: WORKDIR_OPT = None) -> None:
    """Show an experiment's state, checked against the engine (exit 4 if unknown).

    A failed or lost experiment shows its error line (the training's own error, else the record's
    message) and its log; with --json as "failure": {message, reason, log}.

    Example: infra status blat-linear-3f2a9c01de --json
    """
    from runner.run.reconcile import reconcile
    from runner.run.records import find

    record = reconcile(find(resolve_workdir(workdir), experiment_id))
    doc = status_document(record)
    failed = failure(record)
    if failed:
        doc["failure"] = failed  # not "error": that key marks a command's own error document
    if json_out:
        emit_json(doc)
        return
    for key, value in doc.items():
        if value is not None and not isinstance(value, dict):
            typer.echo(f"{key:14} {value}")
    if failed:
        typer.echo(f"{'error':14} {terminal_safe(failed['reason'] or failed['message'] or 'no reason recorded')}")
        typer.echo(f"{'log':14} {failed['log']} (infra logs {record.get('experiment_id')})")
    if doc.get("test"):
        typer.echo(
            "test           " + ", ".join(f"{k} {v:.4f}" for k, v in doc["test"].items() if isinstance(v, float))
        )


def logs(
    experiment_id: ID_ARG,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming until the training ends.")] = False,
    tail: Annotated[int | None, typer.Option("--tail", help="Only the last N lines (N >= 1).")] = None,
    workdir: WORKDIR_OPT = None,
) -> None:
    """Print an experiment's training output (stdout and stderr of the container or process).

    Lines longer than 64 KiB are cut with a marker; escape sequences and control characters are
    removed (colours are kept when stdout is a terminal). A log over the limit shows where its
    middle was dropped (docs/experiments.md).

    Example: infra logs blat-linear-3f2a9c01de --follow --tail 20
    """
    import os
    import sys

    from runner.errors import UsageError
    from runner.run.logs import follow_logs
    from runner.run.records import find

    if tail is not None and tail < 1:
        raise UsageError(f"--tail {tail}: use a number of lines of at least 1 (leave --tail out for the whole log)")
    exp = find(resolve_workdir(workdir), experiment_id)
    out = sys.stdout

    def on_line(line: str) -> None:
        out.write(line + "\n")
        if follow:
            out.flush()

    try:
        follow_logs(exp, on_line, follow=follow, tail=tail, keep_colors=out.isatty() and "NO_COLOR" not in os.environ)
        out.flush()
    except BrokenPipeError:  # `infra logs ID | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())


def stop(
    experiment_id: ID_ARG,
    timeout: Annotated[
        int, typer.Option("--timeout", help="Seconds (>= 0) to wait for a graceful stop before killing.")
    ] = 60,
    json_out: JSON_OPT = False,
    workdir: WORKDIR_OPT = None,
) -> None:
    """Stop a running experiment gracefully (it checkpoints) and mark it cancelled.

    Stopping an experiment that already ended only reports its state.

    Example: infra stop blat-linear-3f2a9c01de --timeout 30
    """
    from runner.errors import UsageError
    from runner.run.launch import stop_experiment
    from runner.run.records import find

    if timeout < 0:
        raise UsageError(f"--timeout {timeout}: use a number of seconds of at least 0 (0 kills at once)")
    record = stop_experiment(
        find(resolve_workdir(workdir), experiment_id), timeout=timeout, reason="stopped with 'infra stop'"
    )
    if json_out:
        emit_json(status_document(record))
    say(f"experiment {experiment_id} {record['state']}")


def track(
    experiment_id: ID_ARG,
    mlflow_uri: Annotated[
        str | None, typer.Option("--mlflow-uri", help="Tracking server; default: the plan's tracking.mlflow_uri.")
    ] = None,
    experiment: Annotated[
        str | None, typer.Option("--experiment", help="MLflow experiment; default: tracking.experiment or the name.")
    ] = None,
    json_out: JSON_OPT = False,
    workdir: WORKDIR_OPT = None,
) -> None:
    """Log a finished experiment's latest attempt to MLflow (again: each call makes a new MLflow run).

    For an attempt whose automatic logging failed (its events.jsonl has `tracking_failed`), or an
    experiment whose plan had no tracking section. Exit 3 when the server cannot be reached.

    Example: infra track blat-linear-3f2a9c01de --mlflow-uri http://mlflow.lab:5000
    """
    from runner.run.reconcile import reconcile
    from runner.run.records import find
    from runner.run.tracking import track_again

    exp = find(resolve_workdir(workdir), experiment_id)
    doc = track_again(exp, reconcile(exp), uri=mlflow_uri, experiment=experiment)
    if json_out:
        emit_json(doc)
    say(f"experiment {experiment_id} logged to MLflow at {doc['mlflow_uri']} (run {doc['run_id']})")


def ls(
    state: Annotated[list[str] | None, typer.Option("--state", help="Only these states (repeatable).")] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Only experiments created since: ISO time or 30m / 12h / 7d.")
    ] = None,
    json_out: JSON_OPT = False,
    workdir: WORKDIR_OPT = None,
) -> None:
    """List the workdir's experiments with their reconciled states and test Spearman, newest first.

    A header row, then one row per experiment (a table on a terminal, aligned text otherwise).
    With --json each experiment also has "test_spearman" (null without metrics).

    Example: infra ls --state running --since 24h --json
    """
    from runner.run.reconcile import list_experiments

    rows = list_experiments(resolve_workdir(workdir), states=state or None, since=since)
    docs = [status_document(r) for r in rows]
    split, name = MAIN_METRIC
    for doc in docs:
        value = (doc.get(split) or {}).get(name)
        doc[f"{split}_{name}"] = value if isinstance(value, int | float) else None
    if json_out:
        emit_json({"experiments": docs})
        return
    headers = ["EXPERIMENT", "STATE", "BACKEND", "CREATED", f"{split.upper()} {name.upper()}"]
    cells = [
        [
            terminal_safe(str(d["experiment_id"])),
            str(d["state"]),
            str(d.get("backend") or ""),
            str(d.get("created_at") or ""),
            "-" if d[f"{split}_{name}"] is None else f"{d[f'{split}_{name}']:.4f}",
        ]
        for d in docs
    ]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(*headers, box=None, header_style="bold")
        for row in cells:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max(len(r[i]) for r in [headers, *cells]) for i in range(len(headers))]
    for row in [headers, *cells]:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
