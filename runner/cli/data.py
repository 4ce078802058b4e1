"""`infra data import` and `infra data demo`: build the SQLite mutation database."""

from typing import Annotated

import typer

from runner.cli.output import emit_json, say

app = typer.Typer(
    help="Build the SQLite mutation database from ProteinGym-style tables.\n\n"
    "Example: infra data import BLAT.csv --db dms.sqlite --source BLAT_ECOLX --template MSIQHF...",
    no_args_is_help=True,
    rich_markup_mode=None,
)

JSON_OPT = Annotated[bool, typer.Option("--json", help="Print one JSON document with the counts on stdout.")]


def _summary(result) -> str:
    note = f", replaced {result.replaced} earlier rows" if result.replaced else ""
    inf = f", {result.non_finite_scores} infinite scores stored as missing" if result.non_finite_scores else ""
    return (
        f"imported {result.rows} rows as {result.source!r} ({result.wild_type_rows} wild type, "
        f"{result.nan_scores} without a score{inf}, up to {result.max_mut_num} mutations){note}"
    )


def _warn_duplicates(result) -> None:
    if result.duplicate_mutants:
        from runner.errors import shorten

        examples = ", ".join(shorten(m, 40) for m in result.duplicate_examples)
        say(
            f"warning: {result.source}: {result.duplicate_mutants} mutant(s) occur more than once (e.g. {examples}); "
            "each row is kept — filter or average them before training if they are repeated measurements"
        )


def _report(result, json_out: bool) -> None:
    if json_out:
        emit_json(result.to_dict())
    _warn_duplicates(result)
    say(f"{result.db}: {_summary(result)}")


@app.command("import")
def import_command(
    file: Annotated[
        str,
        typer.Argument(
            help="CSV/TSV (also .gz or a one-file .zip) or Parquet with a 'mutant' column (e.g. A23G:L45P, "
            "1-based; empty = wild type) and a score column."
        ),
    ],
    db: Annotated[str, typer.Option("--db", help="SQLite database to create or add to.")],
    source: Annotated[
        str, typer.Option("--source", help="Name of this data set (sources.source_text; what data.dataset selects).")
    ],
    template: Annotated[
        str | None,
        typer.Option(
            "--template",
            help="Wild-type protein sequence the mutants refer to; default: taken from the file's mutated_sequence.",
        ),
    ] = None,
    description: Annotated[
        str, typer.Option("--description", help="Free text stored with the source (adds sources.description).")
    ] = "",
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
    """Import a ProteinGym-style table into the mutation database (all rows or none).

    Every mutant is checked against --template (or, without it, the template read from the first
    row's mutated_sequence); every mutated_sequence is checked too. An error names the file and
    line. Rows are streamed: memory does not grow with the file. Infinite scores are stored as
    missing and counted; duplicate mutants are kept and reported. Importing a source name that
    exists is an error unless --replace. Untrusted files are bounded: a row over 1 MiB, over 10,000
    fields, or compressed input unpacking past 4 GiB or 500 times its size is refused (docs/data.md
    "Limits"). Exit codes: 0 imported, 2 bad file, arguments or database, or another import is
    writing the same database.

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


@app.command("import-proteingym")
def import_proteingym_command(
    path: Annotated[
        str,
        typer.Argument(help="Folder or zip of ProteinGym substitution assays (one <DMS_id>.csv per assay)."),
    ],
    db: Annotated[str, typer.Option("--db", help="SQLite database to create or add to.")],
    assays: Annotated[
        list[str] | None,
        typer.Option("--assay", help="Import only this DMS_id (repeatable); default: every assay in PATH."),
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option("--reference", help="ProteinGym's DMS_substitutions.csv; default: the one inside PATH."),
    ] = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="Re-import assays the database already has (default: skip them).")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON document with every assay's outcome on stdout.")
    ] = False,
) -> None:
    """Import ProteinGym assays, each as a source named by its DMS_id, with target_seq as template.

    Each assay is imported in its own transaction (all of its rows or none) and keeps its fold
    columns (fold_random_5, fold_modulo_5, fold_contiguous_5) for split.strategy "column". Assays
    already in the database are skipped, so an interrupted import is resumed by running it again.
    A failing assay is reported and the others are still imported. A DMS_id listed twice or with
    characters other than letters, digits, '_-.+' is refused. Exit codes: 0 every assay imported or
    skipped, 2 any assay failed, bad arguments or reference, or another import is writing the database.

    Example: infra data import-proteingym DMS_ProteinGym_substitutions.zip --db pg.sqlite --reference DMS_substitutions.csv --assay BLAT_ECOLX_Stiffler_2015
    """
    from runner.data.proteingym import import_proteingym
    from runner.errors import EXIT_USAGE

    def progress(entry: dict) -> None:
        if entry["status"] == "imported":
            say(
                f"{entry['assay']}: {entry['rows']} rows, {entry['nan_scores']} without a score, "
                f"fold columns: {', '.join(entry['extra_columns']) or 'none'}"
            )
        elif entry["status"] == "skipped":
            say(f"{entry['assay']}: skipped, already in {db} (--replace re-imports it)")
        else:
            say(f"{entry['assay']}: FAILED: {entry['error']}")

    result = import_proteingym(path, db, assays or [], reference=reference, replace=replace, on_assay=progress)
    if json_out:
        emit_json(result.to_dict())
    for entry in result.assays:
        if entry.get("duplicate_mutants"):
            say(
                f"warning: {entry['assay']}: {entry['duplicate_mutants']} mutant(s) occur more than once "
                f"(e.g. {', '.join(entry['duplicate_examples'])})"
            )
    failed = result.count("failed")
    say(
        f"{db}: {result.count('imported')} assay(s) imported, {result.count('skipped')} skipped, {failed} failed"
        + (f"; {len(result.ignored_files)} file(s) not in the reference ignored" if result.ignored_files else "")
    )
    if failed:
        raise typer.Exit(EXIT_USAGE)
