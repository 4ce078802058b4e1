"""`infra compare`: one table of results across experiments or a study, with the plan keys that differ."""

import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from runner.cli.experiments import complete_experiment_ids, complete_study_ids, resolve_experiment, resolve_study
from runner.cli.options import WORKDIR_OPT, resolve_workdir
from runner.cli.output import echo, emit_json, say

NARROW = 120  # characters of the table when stdout is not a terminal


def compare(
    ids: Annotated[
        list[str] | None,
        typer.Argument(
            help="Experiment ids or unique prefixes (default: every experiment of the workdir).",
            autocompletion=complete_experiment_ids,
        ),
    ] = None,
    study: Annotated[
        str | None,
        typer.Option(
            "--study", help="The points of this study (id or unique prefix).", autocompletion=complete_study_ids
        ),
    ] = None,
    metric: Annotated[
        str,
        typer.Option(
            "--metric", help="Sort by this test metric (best first; lower first for mse/rmse/mae), or val.NAME."
        ),
    ] = "spearman",
    where: Annotated[
        list[str] | None,
        typer.Option(
            "--where", help="Only experiments whose plan has KEY=VALUE (repeatable; VALUE is JSON like --set)."
        ),
    ] = None,
    group_by: Annotated[
        str | None,
        typer.Option("--group-by", help="Fold runs differing only in these plan keys (KEY[,KEY]) into mean ± sd rows."),
    ] = None,
    show_all: Annotated[
        bool, typer.Option("--all", help="Also failed, running and cancelled experiments (with their state).")
    ] = False,
    wide: Annotated[bool, typer.Option("--wide", help="Every column, however wide the table gets.")] = False,
    columns: Annotated[
        str | None, typer.Option("--columns", help="Exactly these columns (NAME[,NAME]), e.g. test.pearson,train.lr.")
    ] = None,
    csv_out: Annotated[
        str | None, typer.Option("--csv", help="Write every column as CSV to this file ('-' for stdout).")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Draw the compared experiments side by side into this .png file.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
    workdir: WORKDIR_OPT = None,
) -> None:
    """Compare experiments: metrics first, what each model kept, then the plan keys that differ.

    Reads the experiments' files only (no engine). Without ids, the workdir's (or with --study the
    study's) succeeded experiments; --all adds the others with their state. Ids given are always
    shown. A group's metric reads `mean ± sd (k/n)`: k of its n points have a value, and `!` marks
    a group where some have none (undefined, or no result). The table fits 120 columns (the
    terminal's width on a terminal); --wide or --columns show more. An unknown id exits 4, an
    ambiguous prefix 2. With --json: {"metric", "study", "differing": [keys], "left_out": {state:
    count}, "experiments": [{experiment_id, name, state, model, embedding, dataset, test, val,
    undefined, kept, n, training_seconds, epochs, exp_dir, plan}, ...]} best first, and with
    --group-by also "groups": [{config, n, experiments, grouped_over, model, embedding, kept, test:
    {M: {mean, sd, n, of, undefined}}, val}].

    Example: infra compare --study blat-demo-study --group-by train.seed --csv results.csv
    """
    from runner.errors import UsageError
    from runner.run import compare as lib
    from runner.run import compare_table as tables

    if json_out and csv_out == "-":
        raise UsageError("--json and --csv - both write stdout; give --csv a file name")
    if wide and columns:
        raise UsageError("--wide and --columns both choose the columns; give one of them")
    target = None
    if plot is not None:
        from runner.run.compare_plot import plot_target

        target = plot_target(plot)
    wd = resolve_workdir(workdir)
    full_ids = [resolve_experiment(wd, i) for i in ids or []]
    sid = resolve_study(wd, study) if study else None
    result = lib.compare(wd, full_ids, metric, where=list(where or []), study=sid, include_all=show_all)
    rows = result.rows
    by = [k.strip() for k in (group_by or "").split(",") if k.strip()]
    groups = lib.group_rows(rows, by, metric) if by else None
    keys = lib.differing_keys(rows)
    if groups is not None:
        cols = tables.group_columns(groups, rows, metric)
        headers, body = tables.group_csv(groups, rows, metric)
    else:
        cols = tables.row_columns(rows, metric, keys)
        headers, body = tables.row_csv(rows, metric, keys)
    chosen = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    width = None if wide else (shutil.get_terminal_size((NARROW, 24)).columns if sys.stdout.isatty() else NARROW)
    shown, hidden = tables.fit(cols, width, chosen)
    if target is not None:
        from runner.run.compare_plot import render, write_plot

        write_plot(target, render(rows, groups, metric, keys))
        say(f"plot written to {target}")
    if csv_out is not None:
        text = tables.to_csv(headers, body)
        if csv_out == "-":
            echo(text, nl=False, data=True)
        else:
            from runner import safefs

            path = Path(csv_out).expanduser()
            if not path.parent.is_dir():
                raise UsageError(f"--csv {csv_out}: folder {path.parent} does not exist; create it first")
            safefs.write_atomic(path.parent.resolve(), path.name, text.encode())
            say(f"CSV written to {path}")
    if json_out:
        doc = {
            "metric": metric,
            "study": sid,
            "differing": keys,
            "left_out": result.left_out,
            "experiments": rows,
        }
        if groups is not None:
            doc["groups"] = groups
        emit_json(doc)
        return
    if csv_out == "-":
        return
    before, after = tables.notes(result, groups, metric, hidden if not chosen else [])
    for line in before:
        say(line)
    if rows:
        echo(tables.render(shown))
    for line in after:
        say(line)
