"""Capturing hostile container output: throughput and peak memory (issue 14, item 8).

Needs a Docker engine and an image with python3 (the base OS image, scripts/make-base-os-image.sh):

    python benchmarks/bench_logs.py [--flood-mb 300] [--line-mib 40] [--image infra-os:bookworm] [--naive] [--json]

Two containers print (1) `--flood-mb` MB of 100-byte lines and (2) one `--line-mib` MiB line
without a newline. For each, a fresh process captures the output the way `infra run` does (live,
following the container) and another saves it after the exit the way `infra status` does after a
detached run; each reports MB/s of container output, and the parent reads its peak RSS with wait4.
A last process runs `infra logs --tail 1` on a `--flood-mb` MB container.log (from the checkout
`--code`). `--naive` measures the capture before issue 14 (docker-py's stream, a partial line
re-joined per chunk, the whole log in memory when saving, no engine log rotation) for the
before/after table in docs/experiments.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LABEL = {"infra.bench": "logs"}


def flood_program(mb: int) -> str:
    return (
        "import sys\n"
        "w = sys.stdout.write\n"
        f"for block in range({mb} * 10):\n"
        "    w(''.join(f'{block * 1000 + i:09d} ' + 'x' * 90 + '\\n' for i in range(1000)))\n"
    )


def line_program(mib: int) -> str:
    return f"import sys\nfor _ in range({mib}):\n    sys.stdout.write('y' * (1 << 20))\n"


def child(mode: str, container_id: str, exp_dir: str, naive: bool) -> None:
    """Runs in its own process: capture or save one container's output into `exp_dir`; JSON on stdout."""
    sys.path.insert(0, str(REPO))
    from runner import engine
    from runner.run import logs

    container = engine.get_client().containers.get(container_id)
    root = Path(exp_dir)
    start = time.perf_counter()
    if naive:
        seen = _naive(mode, container, root)
    elif mode == "live":
        seen = logs.capture(root, engine.log_chunks(container, follow=True))
    else:
        seen = logs.capture(root, engine.log_chunks(container, follow=False), staged=True, flush_each_chunk=False)
    elapsed = time.perf_counter() - start
    kept = sum(p.stat().st_size for p in root.iterdir() if p.name.startswith("container.log"))
    print(json.dumps({"seconds": elapsed, "bytes": seen, "kept_bytes": kept}))


def _naive(mode: str, container, root: Path) -> int:
    """What infra did before: docker-py's per-frame stream, the partial line re-joined per chunk, the
    whole log in memory when saving."""
    if mode == "save":
        data = container.logs(stdout=True, stderr=True, tail="all")
        (root / "container.log").write_text(data.decode("utf-8", errors="replace"))
        return len(data)
    seen = 0
    with open(root / "container.log", "w", encoding="utf-8") as logf:
        partial = b""
        for chunk in container.logs(stream=True, follow=True, stdout=True, stderr=True):
            seen += len(chunk)
            data = partial + chunk
            *lines, partial = data.split(b"\n")
            for line in lines:
                logf.write(line.decode("utf-8", errors="replace").rstrip("\r") + "\n")
        if partial:
            logf.write(partial.decode("utf-8", errors="replace") + "\n")
    return seen


# Linux puts the pre-exec memory's high-water mark into the exec'd process's ru_maxrss, so the
# measured process is spawned by a tiny launcher rather than by this (larger) one.
RSS_PROBE = (
    "import json, os, sys\n"
    "pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ, file_actions=[\n"
    "    (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "with open(sys.argv[1], 'w') as fh:\n"
    "    json.dump([os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024], fh)\n"
)


def measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[dict | None, float, float]:
    """(the JSON the command printed or None, wall seconds, peak RSS in MB) of one process."""
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-S", "-c", RSS_PROBE, result.name, *cmd], stdout=subprocess.PIPE, env=env, cwd=cwd
        ).stdout
        wall = time.perf_counter() - start
        code, rss = json.loads(Path(result.name).read_text())
    if code != 0:
        raise SystemExit(f"{cmd[:4]}… exited {code}")
    try:
        doc = json.loads(out.decode().splitlines()[-1])
    except (ValueError, IndexError):
        doc = None
    return doc, wall, rss


def scenario(client, image: str, name: str, program: str, naive: bool, log_config: dict | None) -> dict:
    top = Path(tempfile.mkdtemp(prefix=f"infra-bench-logs-{name}-"))
    kwargs = {"log_config": log_config} if log_config else {}
    container = client.containers.run(image, ["python3", "-c", program], detach=True, labels=LABEL, **kwargs)
    try:
        results = {}
        for mode in ("live", "save"):
            exp = top / mode
            exp.mkdir()
            cmd = [sys.executable, __file__, "--child", mode, container.id, str(exp)] + (["--naive"] if naive else [])
            doc, _, rss = measured(cmd)
            results[mode] = {
                "output_mb": round(doc["bytes"] / 1e6, 1),
                "kept_mb": round(doc["kept_bytes"] / 1e6, 1),
                "seconds": round(doc["seconds"], 1),
                "mb_per_s": round(doc["bytes"] / 1e6 / max(doc["seconds"], 1e-9), 1),
                "peak_rss_mb": round(rss),
            }
        return results
    finally:
        container.remove(force=True)
        shutil.rmtree(top, ignore_errors=True)


def tail_of_big_log(mb: int, code: Path) -> dict:
    """`infra logs ID --tail 1`, run from the checkout `code`, on an experiment whose container.log is
    `mb` MB of lines."""
    sys.path.insert(0, str(REPO))
    from runner.run.records import Experiment, new_record

    top = Path(tempfile.mkdtemp(prefix="infra-bench-logs-tail-"))
    try:
        exp = Experiment(top / "experiments" / "big-0000000000")
        exp.make_layout()
        record = new_record(exp, name="big", backend="local", plan_sha="0" * 64, attempt=1, previous=None)
        record["state"] = "succeeded"
        exp.write(record)
        block = "".join(f"{i:09d} " + "x" * 90 + "\n" for i in range(10000)).encode()
        with open(exp.root / "container.log", "wb") as fh:
            for _ in range(mb):
                fh.write(block)
        cmd = [sys.executable, "-m", "runner", "logs", exp.id, "--tail", "1", "--workdir", str(top)]
        env = {**os.environ, "PYTHONPATH": str(code)}
        _, wall, rss = measured(cmd, env, cwd=top)  # not the checkout: `-m` puts the cwd first on sys.path
        return {"log_mb": mb, "seconds": round(wall, 2), "peak_rss_mb": round(rss)}
    finally:
        shutil.rmtree(top, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood-mb", type=int, default=300)
    parser.add_argument("--line-mib", type=int, default=40)
    parser.add_argument("--image", default=os.environ.get("INFRA_BASE_OS", "infra-os:bookworm"))
    parser.add_argument("--naive", action="store_true", help="measure the code before issue 14")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--code",
        type=Path,
        default=REPO,
        help="checkout whose `infra logs` is measured (e.g. an export of an old commit)",
    )
    parser.add_argument("--child", nargs=3, metavar=("MODE", "CONTAINER", "EXP_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, naive=args.naive)
        return 0
    sys.path.insert(0, str(REPO))
    from runner import engine
    from runner.run import logs

    client = engine.get_client()
    log_config = None if args.naive else logs.docker_log_config(logs.log_limit())
    doc = {
        "variant": "naive (before)" if args.naive else "bounded (after)",
        "limit_bytes": logs.log_limit(),
        "flood": scenario(client, args.image, "flood", flood_program(args.flood_mb), args.naive, log_config),
        "long_line": scenario(client, args.image, "line", line_program(args.line_mib), args.naive, log_config),
        "tail_1": tail_of_big_log(args.flood_mb, args.code),
    }
    if args.json:
        print(json.dumps(doc))
        return 0
    print(f"{doc['variant']}, log limit {doc['limit_bytes'] >> 20} MiB")
    for name, label in (("flood", f"{args.flood_mb} MB of lines"), ("long_line", f"one {args.line_mib} MiB line")):
        for mode, r in doc[name].items():
            print(
                f"  {label:18} {mode:4}: {r['output_mb']:7.1f} MB in {r['seconds']:6.1f} s = {r['mb_per_s']:6.1f} MB/s, "
                f"peak RSS {r['peak_rss_mb']:5d} MB, kept {r['kept_mb']:.1f} MB"
            )
    t = doc["tail_1"]
    print(f"  logs --tail 1 on {t['log_mb']} MB: {t['seconds']:.2f} s, peak RSS {t['peak_rss_mb']} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
