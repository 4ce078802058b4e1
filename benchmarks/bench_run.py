"""Overhead of `infra run` over a plain `docker run` of the same image and command (issue 4).

Needs a Docker engine, the base OS image and wheelhouse (see .ci/run), and takes a minute or two:

    INFRA_BASE_OS=infra-os:bookworm INFRA_TORCH_SPEC=torch==2.13.0 python benchmarks/bench_run.py [--repeat 3]

Prints, with the images cached: the median wall time of `infra run` of a trivial plan (1 epoch on
200 variants), of `docker run --rm` of the same image and `infra-train` command, and the
difference; and the time `infra run` spends deciding that no rebuild is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], **kw) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, **kw)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from runner import engine
    from runner.data.importer import build_demo_db
    from runner.images.decide import decide_image

    top = Path(tempfile.mkdtemp(prefix="infra-bench-"))
    work = top / "work"
    shutil.copytree(REPO / "plugins_template", work)
    db = work / "data" / "blat_ecolx.db"
    build_demo_db(db)
    plan = json.loads((work / "plans" / "demo.json").read_text())
    plan["data"]["db"] = str(db)
    plan["data"]["limit"] = 200
    plan["train"].update(max_epochs=1)
    plan_path = work / "plans" / "trivial.json"
    plan_path.write_text(json.dumps(plan))
    env = {**os.environ, "INFRA_WORKDIR": str(work)}
    infra = [sys.executable, "-m", "runner"]

    client = engine.get_client()
    start = time.perf_counter()
    decision = decide_image(client, work, lambda line: None)
    if decision.image_id is None:
        subprocess.run([*infra, "build"], env=env, check=True, capture_output=True)
        decision = decide_image(client, work, lambda line: None)
    decide_times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        decide_image(client, work, lambda line: None)
        decide_times.append(time.perf_counter() - start)
    # warm-up run (first container start pays page-cache misses)
    subprocess.run(
        [*infra, "run", str(plan_path), "--set", "experiment_id=bench-warm"], env=env, check=True, capture_output=True
    )

    infra_times, docker_times = [], []
    uid, gid = os.getuid(), os.getgid()
    for i in range(args.repeat):
        infra_times.append(timed([*infra, "run", str(plan_path), "--set", f"experiment_id=bench-{i}"], env=env))
        exp = top / f"plain-{i}"
        (exp / "config").mkdir(parents=True)
        resolved = json.loads((work / "experiments" / f"bench-{i}" / "config" / "plan.json").read_text())
        (exp / "config" / "plan.json").write_text(json.dumps(resolved))
        docker_times.append(
            timed(
                [
                    "docker",
                    "run",
                    "--rm",
                    "--init",
                    "--network",
                    "none",
                    "--user",
                    f"{uid}:{gid}",
                    "-e",
                    "HOME=/tmp/home",
                    "-v",
                    f"{db.parent}:/data:ro",
                    "-v",
                    f"{exp}:/exp",
                    decision.spec.tag,
                    "infra-train",
                    "/exp/config/plan.json",
                    "--exp-dir",
                    "/exp",
                    "--db",
                    f"/data/{db.name}",
                    "--workdir",
                    "/workdir",
                ]
            )
        )
    med_infra, med_docker = statistics.median(infra_times), statistics.median(docker_times)
    print(f"decide 'no rebuild needed' : {statistics.median(decide_times):.3f} s (median of {args.repeat})")
    print(f"infra run (trivial plan)   : {med_infra:.2f} s (median of {args.repeat})")
    print(f"plain docker run           : {med_docker:.2f} s (median of {args.repeat})")
    print(f"infra overhead             : {med_infra - med_docker:+.2f} s (target <= 1.0 s)")
    shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
