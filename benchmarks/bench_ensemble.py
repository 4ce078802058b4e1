"""`infra predict` ensembles: one 5-member ensemble vs 5 single predictions of the same input.

A workdir from the template with the demo database; a study of the demo plan over 5 seeds (short
trainings: the models' quality is not measured); the input: every single substitution of the
template (19 × 286 = 5,434 mutants) as a CSV with an id column, i.e. a saturation-size input. Then,
timed, one after the other on the same warm node:

- singles: `infra predict ID INPUT --out single-i.csv` for each of the 5 members (5 processes);
- ensemble: `infra predict ID1 … ID5 INPUT --out ensemble.csv` (one process, and one core run: the 5
  members of one image are predicted one after the other by one core start-up, then the host merges
  their rows streaming into mean/std/n);
- ensemble --top 100 --rank ucb:1.0 (the host's heap over the merged stream).

Each line: wall seconds, member-rows per second (rows × members / wall), and the ratio to the
singles' total wall time. The core runs' own seconds (each container, from start to exit; members
that share one report it once) are printed too: wall minus them is the host's part (checks, reading,
merging, writing).

Usage: nice python benchmarks/bench_ensemble.py [--backend docker|local] [--members 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AMINO = "ACDEFGHIKLMNPQRSTVWY"


def infra(work: Path, *args: str) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "runner", *args, "--json", "--workdir", str(work)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, json.loads(proc.stdout)


def runs_seconds(doc: dict) -> float:
    """The seconds of an ensemble's core runs, each counted once (its members share them)."""
    return sum({m["run"]: m["seconds"] for m in doc["members"]}.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="docker", choices=["docker", "local"])
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--limit", type=int, default=500, help="data.limit of each member's training")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from runner.data.importer import build_demo_db

    top = Path(tempfile.mkdtemp(prefix="infra-bench-ensemble-"))
    try:
        work = top / "work"
        shutil.copytree(REPO / "plugins_template", work)
        build_demo_db(work / "data" / "blat_ecolx.db")
        seeds = ",".join(str(s) for s in range(1, args.members + 1))
        _, study = infra(work, "run", "plans/demo.json", "--sweep", f"train.seed={seeds}", "--set",
                         f"data.limit={args.limit}", "--set", "train.max_epochs=1", "--backend", args.backend)  # fmt: skip
        ids = [e["experiment_id"] for e in study["experiments"]]
        state = json.loads((work / "experiments" / ids[0] / "config" / "predict.json").read_text())
        template = state["sources"][0]["template"]
        inp = work / "saturation.csv"
        with inp.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "mutant"])
            mutants = [f"{wt}{p}{aa}" for p, wt in enumerate(template, 1) for aa in AMINO if aa != wt]
            writer.writerows([f"v{i}", m] for i, m in enumerate(mutants))
        rows = len(mutants)
        backend = ["--backend", args.backend]
        infra(work, "predict", ids[0], str(inp), "--out", str(top / "warm.csv"), *backend)  # caches warm

        singles = []
        for i, eid in enumerate(ids):
            singles.append(infra(work, "predict", eid, str(inp), "--out", str(top / f"single-{i}.csv"), *backend))
        single_wall = sum(w for w, _ in singles)
        single_core = sum(d["seconds"] for _, d in singles)
        ens_wall, ens = infra(work, "predict", *ids, str(inp), "--out", str(top / "ensemble.csv"), *backend)
        ucb_wall, ucb = infra(work, "predict", *ids, str(inp), "--out", str(top / "top.csv"), "--top", "100",
                              "--rank", "ucb:1.0", *backend)  # fmt: skip
        assert ens["rows"] == rows and ucb["written"] == 100
        member_rows = rows * len(ids)
        members_s = runs_seconds(ens)
        lines = [
            ("5 single predictions" if len(ids) == 5 else f"{len(ids)} single predictions", single_wall, single_core),
            (f"ensemble of {len(ids)}", ens_wall, members_s),
            (f"ensemble of {len(ids)}, --top 100 --rank ucb:1.0", ucb_wall, runs_seconds(ucb)),
        ]
        print(f"# {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; backend {args.backend}; {rows:,} mutants "
              f"(every single substitution of a {len(template)}-residue template), {len(ids)} members")  # fmt: skip
        print(f"{'variant':48} {'wall s':>8} {'members s':>10} {'rows/s':>9} {'vs singles':>10}")
        for label, wall, inner in lines:
            print(f"{label:48} {wall:8.1f} {inner:10.1f} {member_rows / wall:9.0f} {single_wall / wall:9.2f}x")
        doc = {
            "backend": args.backend,
            "cpus": os.cpu_count(),
            "rows": rows,
            "members": len(ids),
            "singles_wall_s": round(single_wall, 2),
            "ensemble_wall_s": round(ens_wall, 2),
            "ensemble_members_s": round(members_s, 2),
            "ensemble_top_wall_s": round(ucb_wall, 2),
            "ratio": round(single_wall / ens_wall, 3),
        }
        if args.json:
            args.json.write_text(json.dumps(doc) + "\n")
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
