"""Overhead per job of the queue path (`infra submit` + `infra worker`) beyond `infra run` (issue 6).

Starts its own redis-server on a free loopback port and one local-backend worker, then submits tiny
plans (1 epoch on 300 variants of the demo database) one at a time and waits for each result:

    python benchmarks/bench_queue.py [--jobs 5]

Per job: the wall time from `submit()` to the finished job seen by the submitter, minus the time the
worker spent inside `runner.run.launch.run` (what `infra run` itself would spend). The difference is the
queue's overhead: validation and id at submit, enqueue, dequeue, loading the plan again on the
worker, storing the result, and the submitter noticing it (polled every 5 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from rq.job import Job

    from runner.data.importer import build_demo_db
    from runner.plan.load import load_plan
    from runner.queue.connection import connect, serializer
    from runner.queue.submit import submit

    top = Path(tempfile.mkdtemp(prefix="bench-queue-"))
    work = top / "work"
    shutil.copytree(REPO / "plugins_template", work)
    build_demo_db(work / "data" / "blat.db")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    redis_proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    worker = None
    try:
        time.sleep(0.3)
        conn = connect(url, retries=6)
        env = {**os.environ, "INFRA_WORKDIR": str(work)}
        worker = subprocess.Popen(
            [sys.executable, "-m", "runner", "worker", "--redis", url, "--backend", "local", "--heartbeat-ttl", "30"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        rows = []
        for i in range(args.jobs + 1):  # the first job warms the worker up and is not counted
            plan = {
                "name": f"bench-{i}",
                "data": {"db": str(work / "data" / "blat.db"), "limit": 300},
                "model": {"name": "linear"},
                "train": {"max_epochs": 1, "seed": i},
            }
            start = time.perf_counter()
            loaded = load_plan(f"bench-{i}", [], workdir=work, text=json.dumps(plan))
            doc = submit(conn, loaded.resolved, work)
            submitted = time.perf_counter()
            while True:
                job = Job.fetch(doc["job_id"], connection=conn, serializer=serializer())
                status = job.get_status(refresh=False)
                if status in ("finished", "failed"):
                    break
                time.sleep(0.005)
            total = time.perf_counter() - start
            result = job.return_value()
            assert status == "finished" and result["state"] == "succeeded", (status, job.latest_result())
            if i:
                rows.append(
                    {
                        "total_s": total,
                        "run_s": result["run_seconds"],
                        "overhead_s": total - result["run_seconds"],
                        "submit_s": submitted - start,
                    }
                )
        summary = {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}
        summary["jobs"] = len(rows)
        print(json.dumps({"median": summary, "per_job": [{k: round(v, 3) for k, v in r.items()} for r in rows]}))
        print(
            f"queue overhead per job beyond infra run: median {summary['overhead_s']:.3f} s "
            f"(submit {summary['submit_s']:.3f} s; run itself {summary['run_s']:.2f} s) over {len(rows)} jobs",
            file=sys.stderr,
        )
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
