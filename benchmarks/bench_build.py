"""Image-build benchmark: the time to decide "no rebuild needed" and a plugin-only rebuild.

    python benchmarks/bench_build.py [--workdir DIR] [--repeat N]

Needs a running Docker engine and the base image: INFRA_BASE_IMAGE when set, else the CPU base of
this checkout (built when missing, which takes minutes the first time: see images/README.md).
Works on a temporary copy of the workdir (default: plugins_template/, or a one-file workdir) and
removes the plugin images it makes. Targets (issue 4): decide ≤ 0.5 s, plugin-only rebuild ≤ 5 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runner import engine, images  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "plugins_template")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    client = engine.get_client()
    base_tag = os.environ.get("INFRA_BASE_IMAGE")
    if not base_tag:
        t = time.perf_counter()
        ref = images.ensure_base_image(
            client, base_image=images.CPU_BASE_ARGS["BASE_IMAGE"], torch_spec=images.CPU_BASE_ARGS["TORCH_SPEC"]
        )
        print(f"base image {ref.tag}: {'built' if ref.built else 'cached'} in {time.perf_counter() - t:.2f} s")
        base_tag = ref.tag

    made: list[str] = []
    with tempfile.TemporaryDirectory(prefix="infra-bench-") as tmp:
        wd = Path(tmp) / "wd"
        if args.workdir.is_dir():
            shutil.copytree(args.workdir, wd, ignore=shutil.ignore_patterns("experiments", "__pycache__"))
        else:
            (wd / "model").mkdir(parents=True)
            (wd / "model" / "__init__.py").write_text("")
        probe = wd / "model" / "_bench_probe.py"
        probe.parent.mkdir(parents=True, exist_ok=True)
        try:
            probe.write_text(f"STAMP = {time.time_ns()}\n")
            first = images.ensure_plugin_image(client, wd, base_tag)
            made.append(first.tag)
            print(f"plugin image {first.tag}: first build {first.seconds:.2f} s")

            decide = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                ref = images.ensure_plugin_image(client, wd, base_tag)
                decide.append(time.perf_counter() - t)
                assert not ref.built, "an unchanged workdir was rebuilt"
            print(
                f"decide 'no rebuild needed': median {statistics.median(decide):.3f} s, "
                f"max {max(decide):.3f} s over {args.repeat} (target <= 0.5 s)"
            )

            rebuild = []
            for i in range(args.repeat):
                probe.write_text(f"STAMP = {time.time_ns()}  # edit {i}\n")
                t = time.perf_counter()
                ref = images.ensure_plugin_image(client, wd, base_tag)
                rebuild.append(time.perf_counter() - t)
                made.append(ref.tag)
                assert ref.built
            print(
                f"plugin-only rebuild: median {statistics.median(rebuild):.2f} s, "
                f"max {max(rebuild):.2f} s over {args.repeat} (target <= 5 s)"
            )
        finally:
            for tag in made:
                engine.remove_image(client, tag, force=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
