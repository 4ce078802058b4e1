"""`python -m runner.run.local_wrapper [--log-dir EXP_DIR] EXIT_FILE CMD...`: the local backend's container.

Runs CMD, forwards SIGTERM/SIGINT to it (so the core can checkpoint and exit gracefully), and
writes CMD's exit code to EXIT_FILE atomically, so a detached run or one whose runner died is
reconciled with its true result. With `--log-dir`, CMD's stdout and stderr go through a pipe into
the experiment's bounded log (`runner.run.logs`: capped lines, the per-experiment limit), and the
exit code is written only after the log is complete. Imports nothing beyond the standard library
and infra's own log capture.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

CAPTURE_GRACE_S = 10  # after CMD exits, how long a process it left holding the pipe may delay the exit code


def _capture(log_dir: str, pipe) -> None:
    from pathlib import Path

    from runner.run.logs import capture_fd

    try:
        capture_fd(Path(log_dir), pipe.fileno())
    except Exception as exc:  # never leave CMD blocked on a full pipe
        print(f"infra: the log of {log_dir} could not be written: {exc}", file=sys.stderr, flush=True)
        while os.read(pipe.fileno(), 1 << 20):
            pass


def main(argv: list[str]) -> int:
    log_dir = None
    if argv[:1] == ["--log-dir"]:
        log_dir, argv = argv[1], argv[2:]
    exit_file, cmd = argv[0], argv[1:]
    capture = None
    if log_dir is None:
        child = subprocess.Popen(cmd)
    else:
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        capture = threading.Thread(target=_capture, args=(log_dir, child.stdout), daemon=True)
        capture.start()

    def forward(signum, _frame):
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = child.wait()
    if code < 0:  # killed by a signal: report it the way a shell (and Docker) would
        code = 128 - code
    if capture is not None:
        capture.join(CAPTURE_GRACE_S)
    tmp = f"{exit_file}.tmp"
    with open(tmp, "w") as fh:
        fh.write(f"{code}\n")
    os.replace(tmp, exit_file)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
