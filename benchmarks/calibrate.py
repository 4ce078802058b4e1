"""Model-quality calibration of the built-in models with their DEFAULT parameters (issue 3 "Show").

Runs the real training core (`run_experiment`) and prints test Spearman and training time:
  BLAT_ECOLX (Stiffler 2015), random 5-fold CV, mean test Spearman — linear, cnn (mlp optional)
  GB1 (Wu 2016, 149,361 variants), random 70/10/20 — linear, mlp, cnn

Usage: python benchmarks/calibrate.py [--datasets blat,gb1] [--models linear,mlp,cnn] [--folds 5]
                                      [--gb1-transform log] [--seed 0] [--workdir /tmp/calib] [--json OUT]
The GB1 database is built with benchmarks/make_gb1_db.py and the BLAT one with the demo builder.
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


def build_dbs(work: Path, datasets: list[str]) -> dict[str, Path]:
    dbs = {}
    if "blat" in datasets:
        from runner.data.importer import build_demo_db

        dbs["blat"] = work / "blat.sqlite"
        if not dbs["blat"].exists():
            build_demo_db(dbs["blat"])
    if "gb1" in datasets:
        dbs["gb1"] = work / "gb1.sqlite"
        if not dbs["gb1"].exists():
            subprocess.run([sys.executable, str(REPO / "benchmarks/make_gb1_db.py"), str(dbs["gb1"])], check=True)
    return dbs


def run_one(plan: dict, exp: Path) -> dict:
    from runner.core.experiment import run_experiment
    from runner.plan.models import Plan

    resolved = Plan.model_validate(plan).model_dump(mode="json")
    shutil.rmtree(exp, ignore_errors=True)  # a fresh run each time, never a resume of an older one
    t0 = time.perf_counter()
    metrics = run_experiment(resolved, exp)
    metrics["wall_seconds"] = time.perf_counter() - t0
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="blat,gb1")
    parser.add_argument("--models", default="linear,mlp,cnn")
    parser.add_argument("--folds", type=int, default=5, help="BLAT folds to run (of 5)")
    parser.add_argument("--gb1-transform", default="log", help="data.transform for GB1 (DESIGN §3: log lifts every model)")
    parser.add_argument("--seed", type=int, default=0, help="train.seed (weights, shuffling, dropout)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    datasets, models = args.datasets.split(","), args.models.split(",")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="infra-calib-"))
    work.mkdir(parents=True, exist_ok=True)
    dbs = build_dbs(work, datasets)
    rows = []
    for ds in datasets:
        for model in models:
            plan = {"name": f"calib-{ds}-{model}", "data": {"db": str(dbs[ds])}, "model": {"name": model},
                    "train": {"seed": args.seed}}
            if ds == "blat":
                results = []
                for fold in range(args.folds):
                    p = {**plan, "split": {"strategy": "random", "n_folds": 5, "fold": fold}}
                    results.append(run_one(p, work / f"{ds}-{model}-f{fold}"))
                    print(f"  {ds} {model} fold {fold}: test spearman {results[-1]['test']['spearman']:.3f} "
                          f"({results[-1]['training_seconds']:.0f}s)", flush=True)
                split = f"random 5-fold ({args.folds} run)"
            else:
                p = {**plan, "data": {**plan["data"], "transform": args.gb1_transform},
                     "split": {"strategy": "random", "test_fraction": 0.2, "val_fraction": 0.1}}
                results = [run_one(p, work / f"{ds}-{model}")]
                split = f"random 70/10/20, transform={args.gb1_transform}"
            spearman = sum(r["test"]["spearman"] for r in results) / len(results)
            seconds = sum(r["training_seconds"] for r in results)
            epochs = sum(r["epochs"] for r in results)
            row = {"dataset": ds, "model": model, "split": split, "test_spearman": round(spearman, 4),
                   "training_seconds": round(seconds, 1), "epochs": epochs, "n": results[0]["n"]}
            rows.append(row)
            print(f"{ds:5s} {model:7s} {split:38s} spearman {spearman:.3f}  train {seconds:7.1f}s  epochs {epochs}",
                  flush=True)
    print("\n| data set | model | split | test Spearman | training time (s) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | {r['model']} | {r['split']} | {r['test_spearman']:.3f} | {r['training_seconds']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
