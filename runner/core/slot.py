"""`python -m runner.core.slot --control DIR --workdir W`: a study slot, the core's half of `runner.run.slots`.

One process that runs a study's points one after another: torch, Lightning and the plugins are
imported once, and what the points share (the selected rows, their splits, closed-form fits:
`runner.core.shared`) is computed once. For each point the host writes `point-NNNNNN.json` into the
control folder; the slot prints `@@infra-slot begin SEQ ID`, runs the point exactly as
`infra-train` runs an experiment (`runner.core.cli.run_point`: the same exit codes, the same
`infra-train: error:` line), then prints `@@infra-slot end SEQ CODE`.

Stops: `stop-NNNNNN` in the control folder stops that point as SIGTERM stops a single run in
training (the step finishes, last.ckpt is saved, exit 143) and the slot goes on; SIGTERM to the
slot stops the current point the same way and ends the slot; so does an `alive` file the host
stopped touching (the host was killed). A stop that comes while the point loads its data takes
effect at its first step; one that comes after its training lets it finish. `quit`, or no point
for `--idle-exit` seconds, ends an idle slot.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from runner.run.jobs import SLOT_ALIVE, SLOT_MARK, SLOT_QUIT, slot_point_file, slot_stop_file

log = logging.getLogger(__name__)

POLL_S = 0.05


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infra-slot", description="Run a study's points one after another.")
    parser.add_argument("--control", required=True, help="the slot's control folder (written by the host)")
    parser.add_argument("--workdir", default=None, help="workdir with plugin folders")
    parser.add_argument("--idle-exit", type=float, default=600.0, help="exit after this many seconds without a point")
    parser.add_argument("--alive-timeout", type=float, default=60.0, help="exit when the host's alive file is this old")
    return parser


class SlotLoop:
    def __init__(self, control: Path, workdir, idle_exit: float, alive_timeout: float):
        from runner.core.shared import SharedData

        self.control = control
        self.workdir = workdir
        self.idle_exit = idle_exit
        self.alive_timeout = alive_timeout
        self.shared = SharedData()
        self.ending = False  # SIGTERM to the slot, or its host is gone: no point after the current one
        self.stop = None  # the running point's GracefulStop
        self.stop_wanted = False  # the running point was asked to stop, maybe before its GracefulStop existed

    # --- signals and the control folder ---

    def on_sigterm(self, signum, frame) -> None:
        self.ending = True
        self._stop_point()

    def _stop_point(self) -> None:
        """Stop the running point as a single run stops on SIGTERM: the current step finishes, last.ckpt
        is saved, the point exits 143. Never raises here (a signal may land between two points)."""
        self.stop_wanted = True  # `_set_stop` applies it when the point's stop comes into being later
        stop = self.stop
        if stop is not None:
            stop.requested = True
            if stop.trainer is not None:
                stop.trainer.should_stop = True

    def host_gone(self) -> bool:
        try:
            return time.time() - os.stat(self.control / SLOT_ALIVE).st_mtime > self.alive_timeout
        except FileNotFoundError:
            return True

    def watch(self, seq: int, done: threading.Event) -> None:
        """During a point: a stop request, or a host gone, stops it (`_stop_point`)."""
        while not done.wait(0.2):
            gone = self.host_gone()
            if gone or (self.control / slot_stop_file(seq)).exists():
                if gone:
                    self.ending = True
                    log.warning("slot: the host stopped touching %s; stopping this point and the slot", SLOT_ALIVE)
                self._stop_point()
                return

    def next_point(self, seq: int) -> dict | None:
        """The next point's request, or None when the slot should end (quit, idle, host gone, SIGTERM)."""
        idle_since = time.monotonic()
        path = self.control / slot_point_file(seq)
        while not self.ending:
            if path.exists():
                return json.loads(path.read_text(encoding="utf-8"))
            if (self.control / SLOT_QUIT).exists() or self.host_gone():
                return None
            if time.monotonic() - idle_since > self.idle_exit:
                log.info("slot: no point for %.0f s; exiting", self.idle_exit)
                return None
            time.sleep(POLL_S)
        return None

    # --- the loop ---

    def serve(self) -> int:
        from runner.core.cli import run_point

        signal.signal(signal.SIGTERM, self.on_sigterm)
        seq = 1
        while (request := self.next_point(seq)) is not None:
            print(f"{SLOT_MARK} begin {seq} {request['experiment_id']}", flush=True)
            done = threading.Event()
            self.stop_wanted = False
            watcher = threading.Thread(target=self.watch, args=(seq, done), daemon=True)
            watcher.start()
            try:
                code = run_point(
                    Path(request["exp_dir"]) / request["plan"],
                    request["exp_dir"],
                    workdir=self.workdir,
                    db=request["db"],
                    experiment_id=request["experiment_id"],
                    shared=self.shared,
                    on_stop=self._set_stop,
                )
            finally:
                done.set()
                watcher.join()
                self._set_stop(None)
                gc.collect()  # a point's model and trainer go before the next one starts
                if seq == 1:  # torch, Lightning and the plugins, imported by the first point, stay for the
                    gc.freeze()  # slot's life: later collections skip them (a full one cost ~0.3 s a point)
            print(f"infra-slot: point {seq} ended ({code}); {memory_text()}", file=sys.stderr, flush=True)
            print(f"{SLOT_MARK} end {seq} {code}", flush=True)
            seq += 1
        return 0

    def _set_stop(self, stop) -> None:
        self.stop = stop
        if stop is not None and (self.ending or self.stop_wanted):
            stop.requested = True  # asked to stop while the point was starting: it stops at once


def memory_text() -> str:
    """The slot's resident memory now and at its peak (what must not grow with the points it ran)."""
    import resource

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        with open("/proc/self/statm") as fh:
            now_mb = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        now_mb = float("nan")
    return f"rss {now_mb:.0f} MB, peak {peak_mb:.0f} MB"


def main(argv: list[str] | None = None) -> int:
    import warnings

    args = _parser().parse_args(argv)
    os.dup2(2, 1)  # one stream: the markers and the points' output stay in order
    # the shared arrays are read-only on purpose (runner.core.shared); torch only reads them
    warnings.filterwarnings("ignore", message=r"The given NumPy array is not writable")
    from runner.core.plugins import resolve_workdir

    loop = SlotLoop(Path(args.control), resolve_workdir(args.workdir), args.idle_exit, args.alive_timeout)
    return loop.serve()


if __name__ == "__main__":
    sys.exit(main())
