"""`infra predict`: score mutants with a succeeded experiment's trained model."""

from pathlib import Path
from typing import Annotated

import typer

from runner.cli import options
from runner.cli.experiments import complete_experiment_ids, resolve_experiment
from runner.cli.options import WORKDIR_OPT, resolve_workdir
from runner.cli.output import emit_json, say
from runner.run.backends import BackendName


def predict(
    experiment_id: Annotated[
        str,
        typer.Argument(
            help="Experiment id (from 'infra run' or 'infra ls') or a unique prefix; it must have succeeded.",
            autocompletion=complete_experiment_ids,
        ),
    ],
    input_file: Annotated[
        Path | None,
        typer.Argument(
            metavar="[INPUT]",
            help="CSV or TSV (optionally .gz) with a 'mutant' column (A23G:L45P, '' = wild type) against the experiment's template.",
        ),
    ] = None,
    saturation: Annotated[
        bool, typer.Option("--saturation", help="Predict every single substitution of the template instead of INPUT.")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="File to write (atomically). Default: ./predictions-<ID>[-saturation].csv"),
    ] = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="csv or parquet (default: from --out's suffix, else csv).")
    ] = None,
    top: Annotated[int | None, typer.Option("--top", help="Keep only the N highest predictions, best first.")] = None,
    source: Annotated[
        str | None, typer.Option("--source", help="Which template, when the experiment trained on several sources.")
    ] = None,
    backend: Annotated[
        BackendName | None,
        typer.Option(
            "--backend",
            help="docker (the experiment's own image) or local (a host process; trusted code); "
            "default: the backend that trained the experiment.",
            case_sensitive=False,
        ),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            help="Stop the prediction (and write nothing) when it takes longer than this many seconds.",
            metavar="SECONDS",
        ),
    ] = 3600.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON summary document on stdout.")] = False,
    workdir: WORKDIR_OPT = None,
) -> None:
    """Predict with an experiment's model: a CSV/Parquet of mutant, sequence, prediction, error.

    Rows the model cannot take (malformed, position out of range, wrong wild type, a residue the
    vocabulary lacks) keep an 'error' and no prediction. The prediction runs with the training's
    resources (memory, CPUs) and --timeout; the file written is infra's own copy of the checked
    result (CSV cells starting with = + - @ get a leading '). Exit 0 when rows were predicted, 2 when
    none could be, 4 for an unknown experiment, 1 when it did not succeed or failed.

    Example: infra predict blat-demo-3f2a9c01de --saturation --top 10
    """
    from runner.run.predict import PredictRequest
    from runner.run.predict import predict as run_predict

    wd = resolve_workdir(workdir)
    request = PredictRequest(
        resolve_experiment(wd, experiment_id), input_file, saturation, out, fmt, top, source, timeout_s=timeout
    )
    summary = run_predict(wd, request, None if backend is None else options.backend(backend))
    if json_out:
        emit_json(summary)
        return
    reasons = ", ".join(f"{k} {v}" for k, v in summary["errors_by_reason"].items())
    say(
        f"infra: predicted {summary['predicted']:,} of {summary['rows']:,} rows"
        + (f" ({summary['errors']:,} with errors: {reasons})" if summary["errors"] else "")
        + f"; wrote {summary['written']:,} rows to {summary['out']} in {summary['seconds']:.1f}s"
    )
