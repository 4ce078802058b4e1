"""Model-quality calibration of the built-in models with their DEFAULT parameters.

Runs the real training core (`run_experiment`) on every shared real data set and prints, per data
set and built-in model, test Spearman and Pearson, training time and the difference to `ridge`
(the closed-form one-hot ridge: the field's standard supervised baseline and the reference here):
  BLAT_ECOLX (Stiffler 2015, 4,997 single mutants), random 5-fold CV, means over the folds
  GB1 (Wu 2016, 149,361 variants, 4 sites), random 70/10/20
  Bgl3 (Romero 2015, 26,653 variants of a 501-aa enzyme, 1-5 substitutions), random 70/10/20
Every plan is the data set's default: no model parameters, no target transform.

Usage: python benchmarks/calibrate.py [--datasets blat,gb1,bgl3] [--models ridge,linear,...] [--folds 5]
                                      [--gb1-transform none] [--seed 0] [--workdir /tmp/calib] [--json OUT]
       python benchmarks/calibrate.py --from-json ROWS.json ...   (one table from separate runs)
The databases are built on first use (benchmarks/make_gb1_db.py, make_bgl3_db.py, the demo builder).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATASETS = {
    "blat": "BLAT_ECOLX (Stiffler 2015, 4,997 singles)",
    "gb1": "GB1 (Wu 2016, 149,361 variants)",
    "bgl3": "Bgl3 (Romero 2015, 26,653 variants, 501 aa)",
}
REFERENCE = "ridge"


def build_dbs(work: Path, datasets: list[str]) -> dict[str, Path]:
    dbs = {}
    for ds in datasets:
        dbs[ds] = work / f"{ds}.sqlite"
        if dbs[ds].exists():
            continue
        if ds == "blat":
            from runner.data.importer import build_demo_db

            build_demo_db(dbs[ds])
        else:
            subprocess.run([sys.executable, str(REPO / f"benchmarks/make_{ds}_db.py"), str(dbs[ds])], check=True)
    return dbs


def run_one(plan: dict, exp: Path) -> dict:
    from runner.core.experiment import run_experiment
    from runner.plan.models import Plan

    shutil.rmtree(exp, ignore_errors=True)  # a fresh run each time, never a resume of an older one
    t0 = time.perf_counter()
    metrics = run_experiment(Plan.model_validate(plan), exp)
    metrics["wall_seconds"] = time.perf_counter() - t0
    return metrics


def builtin_models() -> list[str]:
    from runner.core import builtins  # noqa: F401  (registers the built-ins)
    from runner.core.models import MODELS

    names = MODELS.names()
    return [REFERENCE, *[n for n in names if n != REFERENCE]] if REFERENCE in names else names


def table(rows: list[dict]) -> str:
    """The markdown table: one row per data set and model, with the difference to the reference."""
    ref = {r["dataset"]: r for r in rows if r["model"] == REFERENCE}
    lines = [
        "| data set | split | model | test Spearman | Δ vs `ridge` | test Pearson | training time (s) | epochs | kept |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = ref.get(r["dataset"])
        delta = "—" if base is None or r["model"] == REFERENCE else f"{r['test_spearman'] - base['test_spearman']:+.3f}"
        lines.append(
            f"| {DATASETS[r['dataset']]} | {r['split']} | `{r['model']}` | {r['test_spearman']:.3f} | {delta} | "
            f"{r['test_pearson']:.3f} | {r['training_seconds']:.1f} | {r['epochs']} | {kept_text(r)} |"
        )
    return "\n".join(lines)


def kept_text(row: dict) -> str:
    """What best.ckpt held: "start", "epoch 12", over folds "start 3/5" (or "epochs"); "—" before the rule."""
    kept = row.get("kept")
    if not kept:
        return "—"
    if len(kept) == 1:
        return kept[0]
    starts = sum(k == "start" for k in kept)
    return f"start {starts}/{len(kept)}" if starts else "epochs"


def merged(runs: list[list[dict]]) -> list[dict]:
    """Rows of several runs in table order: data sets as in DATASETS, ridge first; a later run's row wins."""
    rows = {(r["dataset"], r["model"]): r for run in runs for r in run}
    order = list(DATASETS)
    return sorted(rows.values(), key=lambda r: (order.index(r["dataset"]), r["model"] != REFERENCE, r["model"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--models", default=None, help="comma-separated; default: every built-in, ridge first")
    parser.add_argument("--folds", type=int, default=5, help="BLAT folds to run (of 5)")
    parser.add_argument("--gb1-transform", default="none", help="data.transform for GB1 (default: the plan default)")
    parser.add_argument("--seed", type=int, default=0, help="train.seed (weights, shuffling, dropout)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        metavar="ROWS",
        help="print the table from rows written by earlier runs (--json), e.g. one run per model",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        print(table(merged([json.loads(Path(f).read_text()) for f in args.from_json])))
        return 0
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    datasets = args.datasets.split(",")
    models = args.models.split(",") if args.models else builtin_models()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="infra-calib-"))
    work.mkdir(parents=True, exist_ok=True)
    dbs = build_dbs(work, datasets)
    rows = []
    for ds in datasets:
        for model in models:
            plan = {
                "name": f"calib-{ds}-{model}",
                "data": {"db": str(dbs[ds])},
                "model": {"name": model},
                "metrics": ["spearman", "pearson"],
                "train": {"seed": args.seed},
            }
            if ds == "blat":
                runs = [
                    ({**plan, "split": {"strategy": "random", "n_folds": 5, "fold": fold}}, f"-f{fold}")
                    for fold in range(args.folds)
                ]
                split = f"random 5-fold ({args.folds} run), mean"
            else:
                data = {**plan["data"], "transform": args.gb1_transform} if ds == "gb1" else plan["data"]
                runs = [
                    (
                        {
                            **plan,
                            "data": data,
                            "split": {"strategy": "random", "test_fraction": 0.2, "val_fraction": 0.1},
                        },
                        "",
                    )
                ]
                split = "random 70/10/20" + (
                    f", transform={args.gb1_transform}" if ds == "gb1" and args.gb1_transform != "none" else ""
                )
            results = []
            for p, suffix in runs:
                results.append(run_one(p, work / f"{ds}-{model}{suffix}"))
                r = results[-1]
                print(
                    f"  {ds} {model}{suffix}: test spearman {r['test']['spearman']:.4f} pearson "
                    f"{r['test']['pearson']:.4f} ({r['training_seconds']:.1f}s, {r['epochs']} epochs, "
                    f"kept {r.get('selected') if r.get('selected') == 'start' else r['best_epoch']})",
                    flush=True,
                )
            row = {
                "dataset": ds,
                "model": model,
                "split": split,
                "test_spearman": round(sum(r["test"]["spearman"] for r in results) / len(results), 4),
                "test_pearson": round(sum(r["test"]["pearson"] for r in results) / len(results), 4),
                "training_seconds": round(sum(r["training_seconds"] for r in results), 1),
                "epochs": sum(r["epochs"] for r in results),
                "n": results[0]["n"],
                # what best.ckpt holds per run: "start" (no epoch beat the untrained start on validation)
                # or the epoch it kept
                "kept": [
                    r.get("selected") if r.get("selected") == "start" else f"epoch {r['best_epoch']}" for r in results
                ],
            }
            rows.append(row)
            print(
                f"{ds:5s} {model:7s} spearman {row['test_spearman']:.4f} pearson {row['test_pearson']:.4f} "
                f"train {row['training_seconds']:7.1f}s epochs {row['epochs']}",
                flush=True,
            )
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
