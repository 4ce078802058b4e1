"""Start-up and lifecycle latency of the CLI (issues 2 and 5): prints wall times, median of N runs.

    python benchmarks/bench_cli.py [--repeat 5] [--experiments 200]

Measures `infra --help`, `infra validate` on a real plan and database, and `infra status ID --json`
/ `infra ls --json` in a workdir holding N experiment records. With a Docker engine running, one of
the records is `running` and backed by a real (sleeping) container carrying the infra labels, so
its status includes the engine round trip; without an engine only finished records are timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def median_wall(cmd: list[str], env: dict, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, env=env, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--experiments", type=int, default=200)
    args = parser.parse_args()
    from runner.data.importer import build_demo_db
    from runner.run.records import Experiment, experiments_root, new_record

    work = Path(tempfile.mkdtemp(prefix="infra-bench-cli-"))
    db = work / "blat.db"
    build_demo_db(db)
    plan = work / "plan.json"
    plan.write_text(f'{{"name": "demo", "data": {{"db": "{db}"}}, "model": {{"name": "linear"}}}}')
    for i in range(args.experiments):
        exp = Experiment(experiments_root(work) / f"demo-{i:010d}")
        exp.make_layout()
        record = new_record(exp, name="demo", backend="docker", plan_sha="0" * 64, attempt=1, previous=None)
        record.update(state="succeeded", exit_code=0)
        exp.write(record)
    running_id = None
    container = None
    try:
        import docker

        client = docker.from_env()
        client.ping()
        image = next((t for img in client.images.list() for t in img.tags if t.startswith("infra-base:")), None)
        if image:
            running_id = "demo-running0001"
            container = client.containers.run(
                image,
                ["sleep", "300"],
                detach=True,
                network_mode="none",
                labels={"infra.experiment_id": running_id, "infra.attempt": "1"},
            )
            exp = Experiment(experiments_root(work) / running_id)
            exp.make_layout()
            record = new_record(exp, name="demo", backend="docker", plan_sha="0" * 64, attempt=1, previous=None)
            record.update(state="running", container_id=container.id)
            exp.write(record)
    except Exception as exc:  # no engine: report and time only finished records
        print(f"(no Docker engine: {type(exc).__name__}; timing finished records only)")
    env = {**os.environ, "INFRA_WORKDIR": str(work)}
    infra = [sys.executable, "-m", "runner"]
    try:
        print(f"infra --help                         : {median_wall([*infra, '--help'], env, args.repeat):.3f} s")
        print(
            f"infra validate plan.json             : {median_wall([*infra, 'validate', str(plan)], env, args.repeat):.3f} s"
        )
        print(
            f"infra status ID --json (finished, {args.experiments} exps): "
            f"{median_wall([*infra, 'status', 'demo-0000000007', '--json'], env, args.repeat):.3f} s"
        )
        if running_id:
            print(
                f"infra status ID --json (running, engine checked): "
                f"{median_wall([*infra, 'status', running_id, '--json'], env, args.repeat):.3f} s"
            )
        print(
            f"infra ls --json ({args.experiments} exps)          : {median_wall([*infra, 'ls', '--json'], env, args.repeat):.3f} s"
        )
    finally:
        if container is not None:
            container.remove(force=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
