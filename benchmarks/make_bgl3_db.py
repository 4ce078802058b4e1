"""Build the Bgl3 (Romero et al. 2015) mutation database from the shared raw file with infra's own importer.

26,653 variants of the 501-aa Bgl3 beta-glucosidase construct (1-5 substitutions from error-prone
libraries). The shared CSV already has 1-based, `:`-joined mutants and a `DMS_score` column, so the
importer reads the gzipped file as it is.

Usage: python benchmarks/make_bgl3_db.py OUT.sqlite [--raw DIR] [--replace]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner.data.importer import import_csv  # noqa: E402

RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "dms" / "raw" / "bgl3_romero2015"
SOURCE = "BGL3_Romero_2015"


def build(out: Path, raw: Path = RAW, replace: bool = False):
    template = (raw / "template.txt").read_text().strip()
    return import_csv(
        raw / "bgl3_romero2015.csv.gz",
        out,
        SOURCE,
        template,
        replace=replace,
        description="Bgl3 beta-glucosidase, 1-5 substitutions (Romero et al. 2015, PNAS; via nn4dms)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="database to write, e.g. bgl3.sqlite")
    parser.add_argument(
        "--raw", type=Path, default=RAW, help=f"folder with bgl3_romero2015.csv.gz and template.txt (default {RAW})"
    )
    parser.add_argument("--replace", action="store_true", help="replace the Bgl3 source if the database has it")
    args = parser.parse_args()
    result = build(args.out, args.raw, args.replace)
    print(f"{args.out}: {result.rows} variants ({result.wild_type_rows} wild type, max {result.max_mut_num} mutations)")


if __name__ == "__main__":
    main()
