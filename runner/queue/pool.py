"""`infra worker --gpus 0,1`: one worker process per GPU slot, supervised, signals forwarded."""

from __future__ import annotations

import signal
import subprocess
import sys

from runner.errors import UsageError


def gpu_slots(gpus: str | None) -> list[str | None]:
    """One worker per GPU: "0,1" → ["0", "1"]; "all" → every NVML device (or one "all" slot)."""
    from runner.node import gpu_indices

    if gpus is None or gpus == "none":
        return [gpus]
    if gpus == "all":
        return gpu_indices() or ["all"]
    ids = [g.strip() for g in gpus.split(",")]
    if not all(g.isdigit() for g in ids) or len(set(ids)) != len(ids):
        raise UsageError(f"--gpus {gpus!r}: use device ids like '0,1', 'all' or 'none'")
    return ids


def run_pool(argv: list[str], slots: list[str], name: str) -> int:
    """Start one `infra worker` process per GPU slot and supervise them.

    Signals are forwarded to every child, so the two-stage stop applies to each worker. The children
    get their own process group: a Ctrl-C in the terminal reaches them once (forwarded), not twice,
    which would be the second, cold stop.
    """
    children = []
    for slot in slots:
        cmd = [sys.executable, "-m", "runner", *argv, "--gpus", slot, "--name", f"{name}-gpu{slot}"]
        children.append(subprocess.Popen(cmd, process_group=0))

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max((abs(c) for c in codes), default=0)
