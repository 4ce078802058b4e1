"""Build the GB1 (Wu et al. 2016) mutation database from the raw FLIP file with infra's own importer.

All 149,361 variants of GB1 sites 39, 40, 41 and 54: the `Variants` column (4 letters against the wild
type VDGV) becomes `V39A:D40C`-style mutants on the 56-aa GB1 domain, `Fitness` becomes DMS_score,
and FLIP's `keep` and split columns are kept as extra mutations columns (usable with
`split.strategy = "column"` and `data.where`).

Usage: python benchmarks/make_gb1_db.py OUT.sqlite [--raw DIR] [--replace]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner.data.importer import import_csv  # noqa: E402

RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "dms" / "raw" / "gb1_wu2016"
SOURCE = "SPG1_STRSG_Wu_2016"
TEMPLATE = "MQYKLILNGKTLKGETTTEAVDAATAEKVFKQYANDNGVDGEWTYDDATKTFTVTE"  # first 56 aa of 5LDE_1.fasta
SITES = (39, 40, 41, 54)
WILD_TYPE = "VDGV"
SPLIT_COLUMNS = (
    "keep",
    "one_vs_rest",
    "one_vs_rest_validation",
    "two_vs_rest",
    "two_vs_rest_validation",
    "three_vs_rest",
    "three_vs_rest_validation",
    "sampled",
    "sampled_validation",
    "low_vs_high",
    "low_vs_high_validation",
)


def variants_to_mutant(variants: str) -> str:
    """'ADGV' -> 'V39A' (the sites where the 4-letter string differs from VDGV), '' for the wild type."""
    return ":".join(f"{wt}{site}{aa}" for site, wt, aa in zip(SITES, WILD_TYPE, variants, strict=True) if aa != wt)


def build(out: Path, raw: Path = RAW, replace: bool = False):
    assert all(TEMPLATE[s - 1] == w for s, w in zip(SITES, WILD_TYPE, strict=True)), (
        "template does not carry VDGV at 39/40/41/54"
    )
    with tempfile.TemporaryDirectory() as tmp:
        converted = Path(tmp) / "gb1.csv"
        with (
            gzip.open(raw / "four_mutations_full_data.csv.gz", "rt", newline="") as src,
            converted.open("w", newline="") as dst,
        ):
            reader = csv.DictReader(src)
            writer = csv.writer(dst)
            writer.writerow(["mutant", "DMS_score", *SPLIT_COLUMNS])
            for row in reader:
                if len(row["Variants"]) != 4:
                    raise SystemExit(f"line {reader.line_num}: Variants {row['Variants']!r} is not 4 letters")
                writer.writerow([variants_to_mutant(row["Variants"]), row["Fitness"], *(row[c] for c in SPLIT_COLUMNS)])
        return import_csv(
            converted,
            out,
            SOURCE,
            TEMPLATE,
            extra_columns=SPLIT_COLUMNS,
            replace=replace,
            description="GB1 sites 39/40/41/54, all 20^4 variants (Wu et al. 2016, eLife; via FLIP)",
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="database to write, e.g. gb1.sqlite")
    parser.add_argument(
        "--raw", type=Path, default=RAW, help=f"folder with four_mutations_full_data.csv.gz (default {RAW})"
    )
    parser.add_argument("--replace", action="store_true", help="replace the GB1 source if the database has it")
    args = parser.parse_args()
    result = build(args.out, args.raw, args.replace)
    print(f"{args.out}: {result.rows} variants ({result.wild_type_rows} wild type, max {result.max_mut_num} mutations)")


if __name__ == "__main__":
    main()
