"""`infra status`, `infra logs`, `infra stop`, `infra ls`: experiments as the engine really sees them."""

from pathlib import Path
from typing import Annotated

import typer

from runner.cli.output import emit_json, say
from runner.cli.run import WORKDIR_OPT, _workdir

JSON_OPT = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
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


def status_document(record: dict) -> dict:
    doc = {k: record.get(k) for k in STATUS_KEYS}
    doc["verified"] = record.get("verified", True)
    if record.get("state") == "succeeded":
        from runner.run.records import metrics_summary

        doc.update(metrics_summary(Path(record["exp_dir"])))
    return doc


def status(experiment_id: ID_ARG, json_out: JSON_OPT = False, workdir: WORKDIR_OPT = None) -> None:
    """Show an experiment's state, checked against the engine (exit 4 if unknown).

    Example: infra status blat-linear-3f2a9c01de --json
    """
    from runner.run.reconcile import reconcile
    from runner.run.records import find

    record = reconcile(find(_workdir(workdir), experiment_id))
    doc = status_document(record)
    if json_out:
        emit_json(doc)
        return
    for key, value in doc.items():
        if value is not None and not isinstance(value, dict):
            typer.echo(f"{key:14} {value}")
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
    exp = find(_workdir(workdir), experiment_id)
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
        find(_workdir(workdir), experiment_id), timeout=timeout, reason="stopped with 'infra stop'"
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

    exp = find(_workdir(workdir), experiment_id)
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
    """List the workdir's experiments with their reconciled states, newest first.

    Example: infra ls --state running --since 24h --json
    """
    from runner.run.reconcile import list_experiments

    rows = list_experiments(_workdir(workdir), states=state or None, since=since)
    if json_out:
        emit_json({"experiments": [status_document(r) for r in rows]})
        return
    for r in rows:
        typer.echo(f"{r['experiment_id']:48} {r['state']:10} {r.get('backend') or '':7} {r.get('created_at') or ''}")
