"""A plugin that plays the attacker from inside the training container (tests/test_attack_run.py).

At import it tries what hostile plugin code would try and writes what it could do to
/exp/artifacts/attack.json; the test asserts on that report and on the host afterwards. What it does
is steered by /exp/config/attack.json (written by the test before the run). The registered model
`hostile` is a plain linear model, so the run itself can succeed. With "gate": true the first
training step waits until the test creates metrics/.gate-open (the test holds the run, no clock).
"""

import json
import os
import stat
import time
from pathlib import Path

import torch
from torch import nn

from runner.core.models import ProteinModel, register_model

EXP = "/exp"


def _try(fn):
    try:
        return {"ok": True, "value": fn()}
    except Exception as exc:  # the report records exactly what was refused
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def _write(path, text="pwned"):
    with open(path, "w") as fh:
        fh.write(text)
    return path


def _attack(cfg):
    report = {"uid": os.getuid(), "gid": os.getgid(), "euid": os.geteuid()}
    status = Path("/proc/self/status").read_text()
    report["cap_eff"] = next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff"))
    report["no_new_privs"] = next(line.split()[1] for line in status.splitlines() if line.startswith("NoNewPrivs"))
    report["exp_entries"] = sorted(os.listdir(EXP))
    report["data_entries"] = sorted(os.listdir("/data"))
    report["docker_sock"] = any(
        os.path.exists(p) for p in ("/run/docker.sock", "/var/run/docker.sock", "/data/docker.sock")
    )
    report["write_status"] = _try(lambda: _write(f"{EXP}/status.json"))
    report["write_events"] = _try(lambda: _write(f"{EXP}/events.jsonl"))
    report["write_container_log"] = _try(lambda: _write(f"{EXP}/container.log"))
    report["replace_metrics_dir"] = _try(lambda: os.rename(f"{EXP}/metrics", f"{EXP}/metrics.gone"))
    report["read_secret"] = _try(lambda: Path("/data/secret.txt").read_text())
    for link, target in cfg.get("symlinks", {}).items():
        report[f"symlink {link}"] = _try(lambda link=link, target=target: os.symlink(target, f"{EXP}/{link}"))
    for fifo in cfg.get("fifos", []):
        report[f"fifo {fifo}"] = _try(lambda fifo=fifo: os.mkfifo(f"{EXP}/{fifo}"))
    if cfg.get("setuid"):

        def setuid_copy():
            path = f"{EXP}/artifacts/suid-sh"
            with open("/bin/sh", "rb") as src, open(path, "wb") as dst:
                dst.write(src.read())
            os.chmod(path, 0o6755)
            return oct(stat.S_IMODE(os.stat(path).st_mode))

        report["setuid"] = _try(setuid_copy)
        report["chown_root"] = _try(lambda: os.chown(f"{EXP}/artifacts/suid-sh", 0, 0))
    with open(f"{EXP}/artifacts/attack.json", "w") as fh:
        json.dump(report, fh)


try:
    _cfg = json.loads(Path(f"{EXP}/config/attack.json").read_text())
except (FileNotFoundError, PermissionError):
    _cfg = None
if _cfg is not None and os.path.isdir(EXP):
    _attack(_cfg)


@register_model("hostile")
class Hostile(ProteinModel):
    def __init__(self, seq_len: int, in_dim: int, n_outputs: int = 1):
        super().__init__(seq_len, in_dim, n_outputs)
        self.linear = nn.Linear(seq_len * in_dim, n_outputs)
        self.waited = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cfg and _cfg.get("gate") and not self.waited:
            while not os.path.exists(f"{EXP}/metrics/.gate-open"):
                time.sleep(0.05)
            self.waited = True
        if _cfg and _cfg.get("fail"):
            raise RuntimeError("hostile plugin fails on purpose")
        if _cfg and _cfg.get("flood_bytes"):
            line = "x" * 4095
            for _ in range(_cfg["flood_bytes"] // 4096):
                print(line, flush=False)
            _cfg["flood_bytes"] = 0
        return self._out(self.linear(x.flatten(1)))
