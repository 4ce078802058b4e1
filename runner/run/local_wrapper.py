"""`python -m runner.run.local_wrapper EXIT_FILE CMD...`: the local backend's stand-in for a container.

Runs CMD, forwards SIGTERM/SIGINT to it (so the core can checkpoint and exit gracefully), and
writes CMD's exit code to EXIT_FILE atomically, so a detached run or one whose runner died is
reconciled with its true result. Standard library only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def main(argv: list[str]) -> int:
    exit_file, cmd = argv[0], argv[1:]
    child = subprocess.Popen(cmd)

    def forward(signum, _frame):
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = child.wait()
    if code < 0:  # killed by a signal: report it the way a shell (and Docker) would
        code = 128 - code
    tmp = f"{exit_file}.tmp"
    with open(tmp, "w") as fh:
        fh.write(f"{code}\n")
    os.replace(tmp, exit_file)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
