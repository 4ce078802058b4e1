"""`infra compare`: a metrics table across experiments, with the plan keys that differ."""

from pathlib import Path
from typing import Annotated

import typer

from runner.cli.options import WORKDIR_OPT, resolve_workdir
from runner.cli.output import emit_json, say


def compare(
    ids: Annotated[
        list[str] | None, typer.Argument(help="Experiment ids (default: every experiment of the workdir).")
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
    csv_out: Annotated[
        str | None, typer.Option("--csv", help="Write the table as CSV to this file ('-' for stdout).")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Draw the compared experiments side by side into this .png file.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
    workdir: WORKDIR_OPT = None,
) -> None:
    """Compare experiments: the plan keys that differ, test and val metrics, sizes, training seconds.

    Reads the experiments' files only (no engine). An unknown id exits 4. Each plan key whose value
    is not the same in all compared experiments gets a column. With --json: {"metric", "differing":
    [keys], "experiments": [{experiment_id, name, state, model, embedding, test, val, n,
    training_seconds, epochs, exp_dir, plan}, ...]} best first, and with --group-by also
    "groups": [{config, n, experiments, grouped_over, model, embedding, test: {M: {mean, sd, n}}, val}].

    Example: infra compare --where model.name=cnn --group-by train.seed --csv results.csv
    """
    from runner.errors import UsageError
    from runner.run import compare as lib

    if json_out and csv_out == "-":
        raise UsageError("--json and --csv - both write stdout; give --csv a file name")
    target = None
    if plot is not None:
        from runner.run.compare_plot import plot_target

        target = plot_target(plot)
    rows = lib.compare(resolve_workdir(workdir), list(ids or []), metric, where=list(where or []))
    by = [k.strip() for k in (group_by or "").split(",") if k.strip()]
    groups = lib.group_rows(rows, by, metric) if by else None
    headers, body = lib.group_cells(groups, metric) if groups is not None else lib.table_cells(rows, metric)
    if target is not None:
        from runner.run.compare_plot import render, write_plot

        write_plot(target, render(rows, groups, metric, lib.differing_keys(rows)))
        say(f"plot written to {target}")
    if csv_out is not None:
        text = lib.to_csv(headers, body)
        if csv_out == "-":
            typer.echo(text, nl=False)
        else:
            from runner import safefs

            path = Path(csv_out).expanduser()
            if not path.parent.is_dir():
                raise UsageError(f"--csv {csv_out}: folder {path.parent} does not exist; create it first")
            safefs.write_atomic(path.parent.resolve(), path.name, text.encode())
            say(f"CSV written to {path}")
    if json_out:
        doc = {"metric": metric, "differing": lib.differing_keys(rows), "experiments": rows}
        if groups is not None:
            doc["groups"] = groups
        emit_json(doc)
        return
    if csv_out != "-":
        typer.echo(lib.render_table(headers, body))
