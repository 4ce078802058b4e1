"""Benchmark `infra data import` on a large generated file: rows/s and peak RSS of the importing process.

    python benchmarks/bench_import.py                         # 1 GiB ProteinGym-shaped CSV (~3.1 M rows)
    python benchmarks/bench_import.py --shape short --mb 150  # the issue's shape: mutant,DMS_score,DMS_score_bin

Two shapes: `proteingym` (mutant, mutated_sequence of a 300-aa template, DMS_score, DMS_score_bin,
fold_random_5; 1-4 substitutions per variant; every mutated_sequence is checked by the importer) and
`short` (mutant, DMS_score, DMS_score_bin; ~14 bytes a row, as in the issue's 150 MB / 10.7 M-row
file that took 1.98 GB with the list-based importer). The file is generated first (not timed); the
import runs in a fresh process, which reports its own peak RSS (ru_maxrss) and wall time. Prints one
JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
AMINO = "ACDEFGHIKLMNPQRSTVWY"

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from runner.data.importer import import_csv
t = time.perf_counter()
r = import_csv(sys.argv[2], sys.argv[3], "bench", sys.argv[4] or None,
               extra_columns=[c for c in sys.argv[5].split(",") if c])
seconds = time.perf_counter() - t
print(json.dumps({"rows": r.rows, "seconds": seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "duplicate_mutants": r.duplicate_mutants}))
"""


def generate(path: Path, shape: str, target_bytes: int, seed: int = 0) -> tuple[int, str]:
    """Write the file; return (rows, template). Substitutions are drawn from a fixed pool per row."""
    rng = random.Random(seed)
    template = "".join(rng.choice(AMINO) for _ in range(300))
    singles = [(p, a) for p in range(1, 301) for a in AMINO if a != template[p - 1]]
    rows = 0
    with path.open("w", buffering=1 << 20) as fh:
        if shape == "proteingym":
            fh.write("mutant,mutated_sequence,DMS_score,DMS_score_bin,fold_random_5\n")
        else:
            fh.write("mutant,DMS_score,DMS_score_bin\n")
        written = 0
        chunk: list[str] = []
        while written < target_bytes:
            k = rng.randint(1, 4) if shape == "proteingym" else 1
            picked = sorted({p: (p, a) for p, a in rng.sample(singles, k)}.values())
            mutant = ":".join(f"{template[p - 1]}{p}{a}" for p, a in picked)
            score = rng.gauss(0, 1)
            if shape == "proteingym":
                seq = list(template)
                for p, a in picked:
                    seq[p - 1] = a
                line = f"{mutant},{''.join(seq)},{score:.6f},{int(score > 0)},{rows % 5}\n"
            else:
                line = f"{mutant},{score:.3f},{int(score > 0)}\n"
            chunk.append(line)
            written += len(line)
            rows += 1
            if len(chunk) == 10_000:
                fh.write("".join(chunk))
                chunk.clear()
        fh.write("".join(chunk))
    return rows, template


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("proteingym", "short"), default="proteingym")
    parser.add_argument("--mb", type=float, default=1024.0, help="file size in MiB (default 1024 = 1 GiB)")
    parser.add_argument("--dir", default=None, help="where to write the file and database (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated file and database")
    args = parser.parse_args()

    workdir = Path(args.dir or tempfile.mkdtemp(prefix="bench-import-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data, db = workdir / f"bench-{args.shape}.csv", workdir / f"bench-{args.shape}.sqlite"
    db.unlink(missing_ok=True)
    t = time.perf_counter()
    rows, template = generate(data, args.shape, int(args.mb * 2**20))
    gen_seconds = time.perf_counter() - t
    size = data.stat().st_size
    # the ProteinGym shape exercises the template-from-mutated_sequence path (no --template)
    given_template = "" if args.shape == "proteingym" else template
    extras = "fold_random_5" if args.shape == "proteingym" else ""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPO), str(data), str(db), given_template, extras],
        capture_output=True,
        text=True,
        check=True,
    )
    child = json.loads(out.stdout.strip().splitlines()[-1])
    assert child["rows"] == rows, (child, rows)
    result = {
        "shape": args.shape,
        "file_bytes": size,
        "file_mib": round(size / 2**20, 1),
        "rows": rows,
        "import_seconds": round(child["seconds"], 2),
        "rows_per_second": round(rows / child["seconds"]),
        "mib_per_second": round(size / 2**20 / child["seconds"], 1),
        "peak_rss_mb": round(child["peak_rss_mb"], 1),
        "db_bytes": db.stat().st_size,
        "duplicate_mutants": child["duplicate_mutants"],
        "generate_seconds": round(gen_seconds, 1),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    if not args.keep:
        data.unlink(missing_ok=True)
        db.unlink(missing_ok=True)
        if args.dir is None:
            workdir.rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
