"""`infra status`, `infra logs`, `infra stop`, `infra ls`: experiments as the engine really sees them."""

import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from runner.cli.options import JSON_OPT, WORKDIR_OPT, resolve_workdir
from runner.cli.output import echo, emit_json, print_table, say
from runner.lines import terminal_safe

MAX_COMPLETIONS = 200


def _completion_workdir(ctx: typer.Context | None) -> Path | None:
    flag = ctx.params.get("workdir") if ctx is not None else None
    if flag:
        return Path(flag).expanduser()
    from runner.workdir.store import get_workdir

    return get_workdir(required=False)


def complete_ids(ctx: typer.Context | None, incomplete: str, kinds: tuple[str, ...]) -> list:
    """Shell completion: the workdir's ids of `kinds` that start with `incomplete` (names only, so it
    stays fast); a study comes with the help text "study". Never raises: no workdir, no ids."""
    try:
        from runner.run.records import experiment_ids, study_ids

        workdir = _completion_workdir(ctx)
        if workdir is None:
            return []
        out: list = []
        if "experiment" in kinds:
            out += [i for i in experiment_ids(workdir) if i.startswith(incomplete) and not i.startswith(".")]
        if "study" in kinds:
            out += [(i, "study") for i in study_ids(workdir) if i.startswith(incomplete)]
        return out[:MAX_COMPLETIONS]
    except Exception:  # noqa: BLE001  a completion must never print a traceback into the user's prompt
        return []


def complete_experiment_ids(ctx: typer.Context, incomplete: str) -> list:
    return complete_ids(ctx, incomplete, ("experiment",))


def complete_study_ids(ctx: typer.Context, incomplete: str) -> list:
    return complete_ids(ctx, incomplete, ("study",))


def complete_any_ids(ctx: typer.Context, incomplete: str) -> list:
    return complete_ids(ctx, incomplete, ("experiment", "study"))


def resolve_experiment(workdir: Path, text: str) -> str:
    """The whole experiment id for an id or a unique prefix (exit 2 ambiguous, 4 unknown)."""
    from runner.run.records import resolve_id

    return resolve_id(workdir, text)[1]


def resolve_study(workdir: Path, text: str) -> str:
    """The whole study id for an id or a unique prefix (exit 2 ambiguous, 4 unknown)."""
    from runner.run.records import resolve_id

    return resolve_id(workdir, text, ("study",))[1]


ID_ARG = Annotated[
    str,
    typer.Argument(
        help="Experiment id (from 'infra run' or 'infra ls'), or a unique prefix of one.",
        autocompletion=complete_experiment_ids,
    ),
]
ANY_ID_ARG = Annotated[
    str,
    typer.Argument(
        help="Experiment or study id (from 'infra ls' / 'infra ls --studies'), or a unique prefix of one.",
        autocompletion=complete_any_ids,
    ),
]
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
    "study",
)


MAIN_METRIC = ("test", "spearman")
ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*)?(?:Error|Exception|Interrupt|Exit)\b.*$")
ERROR_TAIL_LINES = 60


def status_document(record: dict) -> dict:
    """The record's public keys, `verified`, and for a succeeded experiment its metrics (test, val,
    n), what the model kept (`kept`) and the metrics without a value (`undefined`)."""
    doc = {k: record.get(k) for k in STATUS_KEYS}
    doc["verified"] = record.get("verified", True)
    if record.get("state") == "succeeded":
        from runner.run.records import metrics_summary, outcome_summary

        doc.update(metrics_summary(Path(record["exp_dir"])))
        doc.update(outcome_summary(Path(record["exp_dir"])))
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


def status(experiment_id: ANY_ID_ARG, json_out: JSON_OPT = False, workdir: WORKDIR_OPT = None) -> None:
    """Show an experiment's state, checked against the engine; or a study's points (exit 4 if unknown).

    A failed or lost experiment shows its error line (the training's own error, else the record's
    message) and its log; with --json as "failure": {message, reason, log}. A succeeded one shows
    what the model kept (`kept`: the fitted start, an epoch, or a closed form) and which metrics
    have no value (`undefined`). For a study id: one row per point (experiment, state, test
    Spearman, kept, duration, its values); with --json the study record with "points": [{index,
    values, experiment_id, state, test_spearman, undefined, kept, duration_s}] and "states".

    Example: infra status blat-linear-3f2a9c01de --json
    """
    from runner.run.reconcile import reconcile
    from runner.run.records import find, resolve_id

    wd = resolve_workdir(workdir)
    kind, full = resolve_id(wd, experiment_id, ("experiment", "study"))
    if kind == "study":
        from runner.run.views import study_status

        doc = study_status(wd, full)
        if json_out:
            emit_json(doc)
            return
        echo(study_text(doc))
        return
    record = reconcile(find(wd, full))
    doc = status_document(record)
    failed = failure(record)
    if failed:
        doc["failure"] = failed  # not "error": that key marks a command's own error document
    if json_out:
        emit_json(doc)
        return
    for key, value in doc.items():
        if value is not None and not isinstance(value, dict):
            echo(f"{key:14} {terminal_safe(str(value))}")
    if failed:
        echo(f"{'error':14} {terminal_safe(failed['reason'] or failed['message'] or 'no reason recorded')}")
        echo(f"{'log':14} {failed['log']} (infra logs {record.get('experiment_id')})")
    for line in outcome_lines(doc):
        echo(line)


def outcome_lines(doc: dict) -> list[str]:
    """`kept`, `warning`, `test`, `val` and `undefined` lines of a succeeded experiment's status (pure)."""
    from runner.run.records import kept_text
    from runner.run.views import metric_text

    lines = []
    kept = doc.get("kept")
    if kept:
        detail = kept.get("why") or ""
        if kept.get("by") and kept.get("value") is not None:
            detail = f"{kept['by']} {kept['value']:.4f}" + (f"; {detail}" if detail else "")
        lines.append(f"{'kept':14} {kept_text(kept)}" + (f" ({detail})" if detail else ""))
        if kept.get("warning"):
            lines.append(f"{'warning':14} {kept['warning']}")
    undefined = doc.get("undefined") or {}
    for split in ("test", "val"):
        values = doc.get(split) or {}
        cells = [
            f"{terminal_safe(str(k))[:40]} {metric_text(v, f'{split}.{k}' in undefined)}"
            for k, v in values.items()
            if v is None or isinstance(v, int | float)
        ]
        if cells:
            lines.append(f"{split:14} " + ", ".join(cells))
    if undefined:
        lines.append(f"{'undefined':14} " + "; ".join(f"{k}: {reason}" for k, reason in undefined.items()))
    return lines


def study_text(doc: dict) -> str:
    """`infra status STUDY`: the study's fields, then one row per point (pure)."""
    from runner.run.compare import flatten, normal
    from runner.run.compare_table import Column, key_cells, render
    from runner.run.records import kept_text
    from runner.run.views import duration_text, metric_text

    states = ", ".join(f"{n} {state}" for state, n in doc["states"].items())
    head = [
        f"{'study':14} {doc['study_id']}",
        f"{'name':14} {doc.get('name') or '-'}",
        f"{'source':14} {doc.get('source') or '-'}",
        f"{'keys':14} {', '.join(doc.get('keys') or []) or '-'}",
        f"{'created_at':14} {doc.get('created_at') or '-'}",
        f"{'points':14} {len(doc['points'])}: {states or 'none'}",
    ]
    points = doc["points"]
    values = [flatten(p["values"]) for p in points]
    keys = list(dict.fromkeys(k for v in values for k in v if any(normal(w.get(k)) is not None for w in values)))
    cols = [
        Column("#", [str(p["index"]) for p in points]),
        Column("experiment", [terminal_safe(p["experiment_id"] or "-") for p in points]),
        Column("state", [str(p["state"]) for p in points]),
        Column("test.spearman", [metric_text(p["test_spearman"], "test.spearman" in p["undefined"]) for p in points]),
        Column("kept", [kept_text(p["kept"]) for p in points]),
        Column("duration", [duration_text(p["duration_s"]) for p in points]),
        *[Column(k, key_cells(k, [v.get(k) for v in values])) for k in keys],
    ]
    return "\n".join(head) + ("\n\n" + render(cols) if points else "")


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

    from runner.errors import UsageError
    from runner.run.logs import follow_logs
    from runner.run.records import find

    if tail is not None and tail < 1:
        raise UsageError(f"--tail {tail}: use a number of lines of at least 1 (leave --tail out for the whole log)")
    wd = resolve_workdir(workdir)
    exp = find(wd, resolve_experiment(wd, experiment_id))
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
    experiment_id: ANY_ID_ARG,
    timeout: Annotated[
        int, typer.Option("--timeout", help="Seconds (>= 0) to wait for a graceful stop before killing.")
    ] = 60,
    json_out: JSON_OPT = False,
    workdir: WORKDIR_OPT = None,
) -> None:
    """Stop a running experiment gracefully (it checkpoints) and mark it cancelled; or every active
    point of a study.

    Stopping an experiment that already ended only reports its state. For a study, each running
    point is stopped (all at once), the study's runner starts no further point (its points not run
    yet stay 'not run'; running the study again runs them and resumes the stopped ones), and the
    study's points are shown as 'infra status STUDY' does. With --json for a study: the status
    document plus "stopped": [ids] and "runner": the pid of its runner when it is still ending, or null.

    Example: infra stop blat-linear-3f2a9c01de --timeout 30
    """
    from runner.errors import UsageError
    from runner.run.launch import stop_experiment
    from runner.run.records import find, resolve_id

    if timeout < 0:
        raise UsageError(f"--timeout {timeout}: use a number of seconds of at least 0 (0 kills at once)")
    wd = resolve_workdir(workdir)
    kind, full = resolve_id(wd, experiment_id, ("experiment", "study"))
    if kind == "study":
        from runner.run.views import stop_study

        doc = stop_study(wd, full, timeout, reason=f"stopped with 'infra stop {full}'")
        if json_out:
            emit_json(doc)
        for line in study_stop_lines(doc):
            say(line)
        return
    record = stop_experiment(find(wd, full), timeout=timeout, reason="stopped with 'infra stop'")
    if json_out:
        emit_json(status_document(record))
    say(f"experiment {full} {record['state']}")


def study_stop_lines(doc: dict) -> list[str]:
    """What `infra stop STUDY` says: what it stopped, the points' states, the runner still going (pure)."""
    by_id = {p["experiment_id"]: p for p in doc["points"]}
    stopped = ", ".join(f"{i} {by_id[i]['state']}" for i in doc["stopped"])
    states = ", ".join(f"{n} {state}" for state, n in doc["states"].items())
    lines = [
        f"study {doc['study_id']}: "
        + (f"stopped {len(doc['stopped'])} point(s) ({stopped})" if doc["stopped"] else "no point was running")
        + f"; points: {states}"
    ]
    waiting = doc["states"].get("not run", 0)
    if waiting:
        lines.append(
            f"{waiting} point(s) not run yet stay so"
            + (f" (the study's runner, pid {doc['runner']}, starts no further point)" if doc.get("runner") else "")
            + "; 'infra run' of the study again runs them and resumes the stopped ones"
        )
    return lines


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

    wd = resolve_workdir(workdir)
    exp = find(wd, resolve_experiment(wd, experiment_id))
    doc = track_again(exp, reconcile(exp), uri=mlflow_uri, experiment=experiment)
    if json_out:
        emit_json(doc)
    say(f"experiment {exp.id} logged to MLflow at {doc['mlflow_uri']} (run {doc['run_id']})")


def ls(
    state: Annotated[list[str] | None, typer.Option("--state", help="Only these states (repeatable).")] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Only experiments created since: ISO time or 30m / 12h / 7d.")
    ] = None,
    study: Annotated[
        str | None,
        typer.Option(
            "--study", help="Only this study's points (id or unique prefix).", autocompletion=complete_study_ids
        ),
    ] = None,
    studies: Annotated[bool, typer.Option("--studies", help="List the workdir's studies instead.")] = False,
    json_out: JSON_OPT = False,
    workdir: WORKDIR_OPT = None,
) -> None:
    """List the workdir's experiments with their reconciled states and results, newest first.

    A header row, then one row per experiment: id, state, model, data set (a ProteinGym id as its
    UniProt entry, e.g. BLAT_ECOLX, when that tells the listed ones apart), what the model kept
    (start, epoch N, closed form), test Spearman (`undef` when the training could compute none,
    `-` without metrics), duration and creation time (UTC). A table on a terminal, aligned text
    otherwise. With --json each experiment also has model, dataset, kept, undefined, test_spearman
    (null when missing or undefined) and duration_s. --study keeps one study's points, in its
    order; --studies lists the studies ({"studies": [...]} with --json).

    Example: infra ls --state running --since 24h --json
    """
    from runner.errors import UsageError
    from runner.run.reconcile import list_experiments
    from runner.run.views import listing_fields

    wd = resolve_workdir(workdir)
    if studies:
        if study or state or since:
            raise UsageError("--studies lists the studies; it takes no --study, --state or --since")
        return _ls_studies(wd, json_out)
    order = None
    if study:
        from runner.run.records import read_study

        points = read_study(wd, resolve_study(wd, study))["points"]
        order = {p["experiment_id"]: i for i, p in enumerate(points) if p["experiment_id"]}
    rows = list_experiments(wd, states=state or None, since=since, only=set(order) if order is not None else None)
    if order is not None:
        rows = sorted((r for r in rows if r.get("experiment_id") in order), key=lambda r: order[r["experiment_id"]])
    docs = [{**status_document(r), **listing_fields(r)} for r in rows]
    if json_out:
        emit_json({"experiments": docs})
        return
    print_table(*ls_cells(docs))


def ls_cells(docs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The `infra ls` table (pure): headers and one row of text per experiment."""
    from runner.run.records import kept_text
    from runner.run.views import created_text, duration_text, metric_text, short_datasets

    split, name = MAIN_METRIC
    short = short_datasets([d.get("dataset") for d in docs])
    headers = ["EXPERIMENT", "STATE", "MODEL", "DATA", "KEPT", f"{split.upper()} {name.upper()}", "DURATION", "CREATED"]
    cells = [
        [
            terminal_safe(str(d["experiment_id"])),
            str(d["state"]),
            d.get("model") or "-",
            short.get(d.get("dataset"), "-"),
            kept_text(d.get("kept")),
            metric_text(d[f"{split}_{name}"], f"{split}.{name}" in (d.get("undefined") or {})),
            duration_text(d.get("duration_s")),
            created_text(d.get("created_at")),
        ]
        for d in docs
    ]
    return headers, cells


def _ls_studies(workdir: Path, json_out: bool) -> None:
    from runner.run.views import created_text, study_list

    docs = study_list(workdir)
    if json_out:
        emit_json({"studies": docs})
        return
    headers = ["STUDY", "NAME", "POINTS", "STATES", "CREATED"]
    cells = [
        [
            terminal_safe(d["study_id"]),
            d.get("name") or "-",
            str(d["points"]),
            ", ".join(f"{n} {s}" for s, n in d["states"].items()) or "-",
            created_text(d.get("created_at")),
        ]
        for d in docs
    ]
    print_table(headers, cells)
