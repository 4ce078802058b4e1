"""`infra data import` and `infra data demo`: build the SQLite mutation database."""

from typing import Annotated

import typer

from runner.cli.output import emit_json, say

app = typer.Typer(
    help="Build the SQLite mutation database from ProteinGym-style CSVs.\n\n"
    "Example: infra data import BLAT.csv --db dms.sqlite --source BLAT_ECOLX --template MSIQHF...",
    no_args_is_help=True,
    rich_markup_mode=None,
)

JSON_OPT = Annotated[bool, typer.Option("--json", help="Print one JSON document with the counts on stdout.")]


def _report(result, json_out: bool) -> None:
    if json_out:
        emit_json(result.to_dict())
    note = f", replaced {result.replaced} earlier rows" if result.replaced else ""
    say(
        f"{result.db}: imported {result.rows} rows as {result.source!r} ({result.wild_type_rows} wild type, "
        f"{result.nan_scores} without a score, up to {result.max_mut_num} mutations){note}"
    )


@app.command("import")
def import_command(
    file: Annotated[
        str,
        typer.Argument(
            help="CSV with a 'mutant' column (e.g. A23G:L45P, 1-based; empty = wild type) and a score column."
        ),
    ],
    db: Annotated[str, typer.Option("--db", help="SQLite database to create or add to.")],
    source: Annotated[
        str, typer.Option("--source", help="Name of this data set (sources.source_text; what data.dataset selects).")
    ],
    template: Annotated[str, typer.Option("--template", help="Wild-type protein sequence the mutants refer to.")],
    description: Annotated[str, typer.Option("--description", help="Free text stored with the source.")] = "",
    score_column: Annotated[
        str, typer.Option("--score-column", help="CSV column that becomes DMS_score.")
    ] = "DMS_score",
    bin_column: Annotated[
        str, typer.Option("--bin-column", help="CSV column that becomes DMS_score_bin (0/1), when present.")
    ] = "DMS_score_bin",
    binarize_cutoff: Annotated[
        float | None, typer.Option("--binarize-cutoff", help="Compute DMS_score_bin as score >= this value.")
    ] = None,
    extra_columns: Annotated[
        str,
        typer.Option(
            "--extra-columns",
            help="Comma-separated CSV columns to keep as extra mutations columns (e.g. split columns).",
        ),
    ] = "",
    replace: Annotated[
        bool, typer.Option("--replace", help="Replace the rows and template of an existing source of the same name.")
    ] = False,
    json_out: JSON_OPT = False,
) -> None:
    """Import a ProteinGym-style CSV into the mutation database (all rows or none).

    Every mutant is checked against --template first; an error names the CSV line and the mutant.
    Importing a source name that exists is an error unless --replace.

    Example: infra data import BLAT_ECOLX.csv --db dms.sqlite --source BLAT_ECOLX --template MSIQHF... --score-column 2500 --binarize-cutoff -1.1595
    """
    from runner.data.importer import import_csv

    extras = [c.strip() for c in extra_columns.split(",") if c.strip()]
    result = import_csv(
        file,
        db,
        source,
        template,
        description=description,
        score_column=score_column,
        bin_column=bin_column or None,
        binarize_cutoff=binarize_cutoff,
        extra_columns=extras,
        replace=replace,
    )
    _report(result, json_out)


@app.command("demo")
def demo_command(
    db: Annotated[str, typer.Option("--db", help="Where to write the demo database.")] = "demo.sqlite",
    replace: Annotated[
        bool, typer.Option("--replace", help="Overwrite the demo source if the database already has it.")
    ] = False,
    json_out: JSON_OPT = False,
) -> None:
    """Write the demo database: BLAT_ECOLX single mutants (Stiffler 2015), bundled with infra.

    Example: infra data demo --db demo.sqlite
    """
    from runner.data.importer import build_demo_db

    _report(build_demo_db(db, replace=replace), json_out)
