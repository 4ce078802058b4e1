"""A 24-point study (4 models x 6 seeds of a small plan on BLAT): one process per point vs long-lived slots.

Needs the base OS image and wheelhouse for the docker backend (see .ci/run), redis-server for
`--queue`, and several minutes:

    python benchmarks/bench_study.py [--backend docker|local] [--parallel 1,2] [--queue] [--epochs 2] [--limit 1500]

Every variant runs the same grid in a workdir of its own (nothing is reused between them), in this
one run, so the ratios compare like with like on a noisy machine. Prints per variant: the wall time
of `infra run --sweep`, the sum of the points' `training_seconds`, wall / (sum / slots) (1.0 would be
no overhead at all), the speed-up over one process per point, and, for slots, each slot's resident
memory after its first and its last point (read from the points' logs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = '[{"name":"ridge"},{"name":"linear"},{"name":"mlp"},{"name":"cnn"}]'
SEEDS = "0,1,2,3,4,5"
RSS = re.compile(rb"infra-slot: point (\d+) ended \(-?\d+\); rss (\d+) MB, peak (\d+) MB")


def make_workdir(top: Path, name: str, db: Path, limit: int = 1500, epochs: int = 2) -> tuple[Path, Path]:
    work = top / name
    shutil.copytree(REPO / "plugins_template", work)
    plan = json.loads((work / "plans" / "demo.json").read_text())
    plan["data"]["db"] = str(db)
    plan["data"]["limit"] = limit
    plan["train"].update(max_epochs=epochs, early_stopping_patience=0)  # every point trains all its epochs
    plan.pop("model", None)
    plan["model"] = {"name": "ridge"}
    path = work / "plans" / "study.json"
    path.write_text(json.dumps(plan))
    return work, path


def run_sweep(work: Path, plan: Path, backend: str, extra: list[str]) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "runner", "run", str(plan), "--sweep", f"model={MODELS}", "--sweep",
           f"train.seed={SEEDS}", "--backend", backend, "--json", "--workdir", str(work), *extra]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, json.loads(proc.stdout)


def memory(doc: dict) -> dict[int, list[tuple[int, str, int, int]]]:
    """Per slot: (its point number, the point's model, rss after it, peak after it) for every point it ran."""
    seen: dict[str, list[tuple[int, str, int, int]]] = {}
    for point in doc["experiments"]:
        exp = Path(point["exp_dir"])
        record = json.loads((exp / "status.json").read_text())
        slot = (record.get("slot") or {}).get("name")
        for m in RSS.finditer((exp / "container.log").read_bytes()):
            seen.setdefault(slot, []).append((int(m[1]), point["label"].split("-")[0], int(m[2]), int(m[3])))
    return {i: sorted(points) for i, points in enumerate(seen.values())}


def memory_lines(label: str, slots: dict[int, list[tuple[int, str, int, int]]]) -> list[str]:
    """A slot's memory after the first and the last point of each model it ran: flat within a model
    means the slot does not grow with the number of points (different models differ in size)."""
    lines = []
    for slot, points in slots.items():
        by_model: dict[str, list[tuple[int, int, int]]] = {}
        for seq, model, rss, peak in points:
            by_model.setdefault(model, []).append((seq, rss, peak))
        parts = [f"{m} #{v[0][0]} {v[0][1]}/{v[0][2]} → #{v[-1][0]} {v[-1][1]}/{v[-1][2]}" for m, v in by_model.items()]
        lines.append(
            f"  {label}, slot {slot}: rss/peak MB after the first → last point of each model: " + "; ".join(parts)
        )
    return lines


def queue_variant(top: Path, db: Path, backend: str, limit: int, epochs: int) -> float:
    """The same grid submitted to Redis and run by two `infra worker --burst` (each with a warm slot)."""
    port = 6391
    server = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(0.5)
        work, plan = make_workdir(top, "queue", db, limit, epochs)
        url = f"redis://127.0.0.1:{port}/0"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "runner", "run", str(plan), "--sweep", f"model={MODELS}", "--sweep",
                        f"train.seed={SEEDS}", "--submit", "--redis", url, "--workdir", str(work)],
                       check=True, capture_output=True)  # fmt: skip
        env = {**os.environ, "INFRA_THREADS": "1"}
        workers = [subprocess.Popen([sys.executable, "-m", "runner", "worker", "--redis", url, "--burst", "--backend",
                                     backend, "--workdir", str(work), "--name", f"bench{i}"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]  # fmt: skip
        for w in workers:
            w.wait()
        return time.perf_counter() - start
    finally:
        server.terminate()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="docker", choices=["docker", "local"])
    parser.add_argument("--parallel", default="1,2", help="slot counts to measure, comma-separated")
    parser.add_argument("--queue", action="store_true", help="also the same grid through --submit and two workers")
    parser.add_argument("--skip-isolated", action="store_true", help="skip one-process-per-point (the slow baseline)")
    parser.add_argument("--limit", type=int, default=1500, help="data.limit of every point (default 1500)")
    parser.add_argument("--epochs", type=int, default=2, help="train.max_epochs of every point (default 2)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from runner.data.importer import build_demo_db

    top = Path(tempfile.mkdtemp(prefix="infra-bench-study-"))
    db = top / "blat.db"
    build_demo_db(db)
    load = os.getloadavg()[0]
    print(f"# {os.cpu_count()} CPUs, load {load:.2f} before; backend {args.backend}; 24 points (4 models x 6 seeds,"
          f" data.limit {args.limit}, {args.epochs} epochs)")  # fmt: skip
    if args.backend == "docker":  # every variant starts with the image built
        warm, _ = make_workdir(top, "warm", db, args.limit, args.epochs)
        subprocess.run(
            [sys.executable, "-m", "runner", "build", "--workdir", str(warm)], check=True, capture_output=True
        )
    rows = []
    variants = [] if args.skip_isolated else [("one process per point (--isolated)", ["--isolated"], 1)]
    variants += [(f"slots, --parallel {n}", ["--parallel", str(n)], n) for n in map(int, args.parallel.split(","))]
    baseline = None
    for label, extra, slots in variants:
        work, plan = make_workdir(top, re.sub(r"\W+", "-", label), db, args.limit, args.epochs)
        wall, doc = run_sweep(work, plan, args.backend, extra)
        training = sum(p.get("training_seconds") or 0 for p in doc["experiments"])
        baseline = baseline or (wall if "--isolated" in extra else None)
        rows.append((label, wall, training, wall / (training / slots), baseline / wall if baseline else None))
        if "--isolated" not in extra:
            print("\n".join(memory_lines(label, memory(doc))))
    print(f"{'variant':40} {'wall s':>8} {'sum train s':>12} {'wall/(sum/slots)':>17} {'speed-up':>9}")
    for label, wall, training, ratio, speedup in rows:
        shown = f"{speedup:.2f}x" if speedup else "-"
        print(f"{label:40} {wall:8.1f} {training:12.1f} {ratio:17.2f} {shown:>9}")
    if args.queue:
        wall = queue_variant(top, db, args.backend, args.limit, args.epochs)
        print(f"{'--submit, 2 workers (warm slots)':40} {wall:8.1f}")
    print(f"# load {os.getloadavg()[0]:.2f} after")
    shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
