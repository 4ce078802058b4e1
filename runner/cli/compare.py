"""`infra compare`: a metrics table across experiments."""

from typing import Annotated

import typer

from runner.cli.output import emit_json
from runner.cli.run import WORKDIR_OPT, _workdir


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
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
    workdir: WORKDIR_OPT = None,
) -> None:
    """Compare experiments: test and val metrics, sizes, model and embedding names, training seconds.

    Reads the experiments' files only (no engine). An unknown id exits 4.
    With --json: {"metric": ..., "experiments": [{experiment_id, name, state, model, embedding,
    test, val, n, training_seconds, epochs, exp_dir}, ...]}, best first.

    Example: infra compare blat-demo-3f2a9c01de blat-demo-9e1b0c44aa --metric spearman
    """
    from runner.run.compare import compare as compare_rows
    from runner.run.compare import table

    rows = compare_rows(_workdir(workdir), list(ids or []), metric)
    if json_out:
        emit_json({"metric": metric, "experiments": rows})
        return
    typer.echo(table(rows, metric))
