"""`infra predict`: score mutants with a succeeded experiment's trained model, or an ensemble's."""

import sys
from pathlib import Path
from typing import Annotated

import typer

from runner.cli import options
from runner.cli.experiments import complete_experiment_ids, complete_study_ids, resolve_experiment, resolve_study
from runner.cli.options import WORKDIR_OPT, resolve_workdir
from runner.cli.output import emit_json, print_table, say
from runner.run.backends import BackendName

PREVIEW_ROWS = 10  # the table under a file written without --top
TABLE_MAX = 1000  # the most rows a table shows (`--out -` on a terminal, --top N)
CELL_MAX = 40  # characters of a mutant's or an input column's cell in the table
ERROR_MAX = 120  # characters of an error cell in the table (the file has it whole)


def predict(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[ID]... [INPUT]",
            help="Experiment ids (or unique prefixes; several make an ensemble), then the INPUT file: a CSV or "
            "TSV (optionally .gz) with a 'mutant' column (A23G:L45P, '' = wild type). Without --saturation the "
            "last one is INPUT.",
            autocompletion=complete_experiment_ids,
        ),
    ] = None,
    study: Annotated[
        str | None,
        typer.Option(
            "--study",
            help="An ensemble of this study's succeeded points (seeds × folds of one configuration).",
            autocompletion=complete_study_ids,
        ),
    ] = None,
    where: Annotated[
        list[str] | None,
        typer.Option("--where", help="With --study: only the points whose plan has KEY=VALUE (repeatable)."),
    ] = None,
    saturation: Annotated[
        bool, typer.Option("--saturation", help="Predict every single substitution of the template instead of INPUT.")
    ] = False,
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            "-o",
            help="File to write (atomically), '-' for stdout. Default: ./predictions-<ID>[-saturation].csv",
        ),
    ] = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="csv or parquet (default: from --out's suffix, else csv).")
    ] = None,
    top: Annotated[int | None, typer.Option("--top", help="Keep only the N best rows (--rank), best first.")] = None,
    rank: Annotated[
        str,
        typer.Option("--rank", help="Ensembles: rank by the mean, or by ucb:K = mean + K × std (e.g. ucb:1.0)."),
    ] = "mean",
    sequences: Annotated[bool, typer.Option("--sequences", help="Show the sequence column in the table too.")] = False,
    table: Annotated[
        bool, typer.Option("--table", help="Show the table on stdout even when stdout is not a terminal.")
    ] = False,
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
            help="Stop a prediction (and write nothing) when one model takes longer than this many seconds.",
            metavar="SECONDS",
        ),
    ] = 3600.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON summary document on stdout.")] = False,
    workdir: WORKDIR_OPT = None,
) -> None:
    """Predict with an experiment's model, or an ensemble's mean, std and n: mutant, the input's columns,
    sequence, prediction, error, measured, in_train.

    Rows the model cannot take (malformed, position out of range, wrong wild type, a residue the
    vocabulary lacks) keep an 'error' and no prediction. Each model runs in its own image with its
    training's resources and --timeout; the file written is infra's own copy of the checked result
    (CSV cells starting with = + - @ get a leading '). On a terminal a table of the first rows is
    shown (--sequences adds the sequences); '--out -' writes the file to stdout (a table on a
    terminal). Exit 0 when rows were predicted, 2 when none could be or the request is bad, 4 for
    an unknown experiment, 1 when one did not succeed or failed.

    Example: infra predict --study blat-demo-study variants.csv --top 10 --rank ucb:1.0
    """
    from runner.errors import UsageError
    from runner.run.predict import STDOUT, PredictRequest
    from runner.run.predict import predict as run_predict

    wd = resolve_workdir(workdir)
    ids, input_file = _split_positionals(list(args or []), saturation, study is not None)
    if where and not study:
        raise UsageError("--where chooses among a study's points: give --study STUDY too")
    to_stdout = out == STDOUT
    if json_out and (to_stdout or table):
        raise UsageError(f"--json and {'--out -' if to_stdout else '--table'} both write stdout; give one of them")
    sid = None
    if study is not None:
        from runner.run.ensemble import study_members

        sid = resolve_study(wd, study)
        ids = study_members(wd, sid, list(where or []))
    else:
        ids = list(dict.fromkeys(resolve_experiment(wd, i) for i in ids))
    shown = not json_out and (table or sys.stdout.isatty())
    table_only = to_stdout and shown  # a terminal gets the table, never the file's bytes
    preview = min(top or (TABLE_MAX if table_only else PREVIEW_ROWS), TABLE_MAX) if shown else 0
    request = PredictRequest(
        tuple(ids),
        input_file,
        saturation,
        Path(out) if out is not None else None,
        fmt,
        top,
        source,
        timeout_s=timeout,
        rank=rank,
        study=sid,
        where=tuple(where or ()),
    )
    stream = None
    if to_stdout and not table_only:
        sys.stdout.flush()
        stream = sys.stdout.buffer
    try:
        result = run_predict(wd, request, None if backend is None else options.backend(backend), stream, preview)
        summary = result.summary
        if json_out:
            emit_json(summary)
            return
        if shown:
            _show(result, sequences)
            sys.stdout.flush()
    except BrokenPipeError:
        # `infra predict ... --out - | head` (or --table into one): the reader has all it wanted. The
        # members ran (their containers are removed), the scratch folder went with the exception;
        # stdout is pointed at /dev/null so that Python's exit flush finds no pipe. Exit 0, as `infra logs`.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    say(_summary_line(summary, table_only))
    written = summary["written"]
    if shown and len(result.shown) < written:
        where_full = "the file at " + summary["out"] if not table_only else "--out FILE"
        say(f"showing the first {len(result.shown):,} of {written:,} rows; all of them: {where_full}")


def _split_positionals(args: list[str], saturation: bool, study: bool) -> tuple[list[str], Path | None]:
    """(experiment ids, INPUT): without --saturation the last positional is INPUT, unless it is the only
    one and no --study is given (then it is the id, and the request lacks its input)."""
    from runner.errors import UsageError

    if saturation:
        if args and Path(args[-1]).is_file() and len(args) > 1:
            raise UsageError("give an INPUT file of mutants or --saturation (not both)")
        ids = args
        input_file = None
    elif len(args) == 1 and not study:
        ids, input_file = args, None
    else:
        ids, input_file = args[:-1], (Path(args[-1]) if args else None)
    if study and ids:
        raise UsageError("give experiment ids or --study, not both")
    return ids, input_file


def _summary_line(summary: dict, table_only: bool) -> str:
    reasons = ", ".join(f"{k} {v}" for k, v in summary["errors_by_reason"].items())
    members = summary.get("members")
    what = f"ensemble of {len(members)} models (ranked by {summary['rank']}); " if members else ""
    place = "the table above" if table_only else summary["out"]
    # each flag on its own: an experiment with data/selected.parquet but no splits/train.npy tells
    # `measured` and not `in_train`
    told = [f"{summary[k]:,} {word}" for k, word in (("measured", "measured"), ("in_train", "in training"))
            if isinstance(summary.get(k), int)]  # fmt: skip
    flags = "; " + ", ".join(told) if told else ""
    return (
        f"infra: {what}predicted {summary['predicted']:,} of {summary['rows']:,} rows"
        + (f" ({summary['errors']:,} with errors: {reasons})" if summary["errors"] else "")
        + flags
        + f"; wrote {summary['written']:,} rows to {place} in {summary['seconds']:.1f}s"
    )


def table_cells(result, sequences: bool) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the table: mutant, the input's columns, [sequence], prediction, [std, n,
    ucb], measured, in_train, and error when a shown row has one (pure; text not yet terminal-safe).
    Every text cell is cut (mutant and input cells to CELL_MAX, errors to ERROR_MAX) but the
    sequence, which --sequences asks for whole (the host refused any longer than the template)."""
    layout, rows = result.layout, result.shown
    members = len(result.summary.get("members") or [])
    errors = any(r.error for r in rows)
    headers = ["mutant", *layout.inputs, *(["sequence"] if sequences else []), "prediction"]
    headers += ["std", "n"] if layout.ensemble else []
    headers += ["ucb"] if layout.ucb else []
    headers += ["measured", "in_train", *(["error"] if errors else [])]

    def number(v):
        return "-" if v is None else f"{v:.4f}"

    def flag(v):
        return "-" if v is None else ("yes" if v else "no")

    body = []
    for r in rows:
        cells = [_cut(r.mutant), *(_cut(c) for c in r.inputs), *([r.sequence] if sequences else [])]
        cells.append(number(r.prediction))
        cells += [number(r.std), str(r.n)] if layout.ensemble else []
        cells += [number(r.ucb)] if layout.ucb else []
        trained = f"{r.in_train}/{members}" if layout.ensemble and r.in_train is not None else flag(r.in_train)
        cells += [flag(r.measured), trained, *([_cut(r.error, ERROR_MAX)] if errors else [])]
        body.append(cells)
    return headers, body


def _cut(text: str, most: int = CELL_MAX) -> str:
    return text if len(text) <= most else text[: most - 1] + "…"


def _show(result, sequences: bool) -> None:
    """The table on stdout: rich on a terminal, aligned plain text otherwise (--table into a pipe)."""
    from runner.lines import terminal_safe

    headers, body = table_cells(result, sequences)
    headers = [terminal_safe(h, shown=True) for h in headers]
    body = [[terminal_safe(c, shown=True) for c in row] for row in body]
    print_table(headers, body, right=frozenset({"prediction", "std", "n", "ucb"}), fold=True)
