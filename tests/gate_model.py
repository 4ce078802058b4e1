"""A plugin model that holds its training at a gate the test controls (copied to a workdir as model/gate.py).

Registered as `gate`: a linear model whose training steps wait until a file exists, so a test can
act while the training is held at a known point instead of hoping the training is slow.

- Where it holds: with `after_checkpoint` (default) once `ckpts/last.ckpt` exists (the end of the
  first epoch), otherwise from the first step. While it waits, `metrics/.gate-waiting` exists.
- What opens it: the file `gate_file` (default `metrics/.gate-open` in the experiment directory,
  which is also mounted into a container), or a stop of the run (a SIGTERM to the training, or
  `infra stop` of a study point: `current_run().stop_requested`), so a stop reaches the trainer,
  which then checkpoints. It polls every 50 ms and never times out.
- `fail: "raise"` raises at construction (a point that fails alone); `fail: "kill"` kills its own
  process with SIGKILL (a study slot that dies, as an out-of-memory kill would).
"""

import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

from runner.core.experiment import current_run
from runner.core.models import ProteinModel, register_model


def _exp_dir() -> Path:
    run = current_run()  # a study slot runs many experiments in one process: ask the core which one
    if run is not None:
        return run.exp_dir
    argv = sys.argv  # the core runs as `python -m runner.core PLAN --exp-dir DIR ...`
    return Path(argv[argv.index("--exp-dir") + 1]) if "--exp-dir" in argv else Path.cwd()


def _stopped() -> bool:
    run = current_run()
    return run is not None and run.stop_requested


@register_model("gate")
class GateModel(ProteinModel):
    def __init__(self, seq_len, in_dim, n_outputs=1, after_checkpoint=True, gate_file=None, fail=None):
        if fail == "raise":
            raise RuntimeError("gate: failing on purpose (fail='raise')")
        if fail == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        super().__init__(seq_len, in_dim, n_outputs)
        self.linear = nn.Linear(seq_len * in_dim, n_outputs)
        root = _exp_dir()
        self.after_checkpoint = bool(after_checkpoint)
        self.checkpoint = root / "ckpts" / "last.ckpt"
        self.gate = Path(gate_file) if gate_file else root / "metrics" / ".gate-open"
        self.waiting = root / "metrics" / ".gate-waiting"
        self.released = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.released and (self.checkpoint.exists() or not self.after_checkpoint):
            self._wait()
        return self._out(self.linear(x.flatten(1)))

    def _wait(self) -> None:
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum, frame):
            self.released = True
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)
        self.waiting.touch()
        try:
            while not self.released and not self.gate.exists() and not _stopped():
                time.sleep(0.05)
        finally:
            self.waiting.unlink(missing_ok=True)
            signal.signal(signal.SIGTERM, previous)
        self.released = True
