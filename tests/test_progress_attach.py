"""A second `infra run` of a running plan attaches to it and shows the same view: the epochs so far,
then the rest as they come. The training is held at the gate model's gate (tests/gate_model.py)
until the second run has attached; the local backend runs the same core without Docker."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.e2e import wait_for
from tests.helpers import REPO, cli, infra_background

pytestmark = [pytest.mark.core, pytest.mark.slow]
EPOCH = r"epoch {n}/2  train_loss \d+\.\d{{4}}  val_loss \d+\.\d{{4}}  val_spearman -?\d+\.\d{{4}}"


def test_attaching_shows_the_epochs_so_far_and_the_rest(tmp_path):
    from runner.data.importer import build_demo_db

    work = tmp_path / "work"
    shutil.copytree(REPO / "plugins_template", work)
    shutil.copy(REPO / "tests" / "gate_model.py", work / "model" / "gate.py")
    build_demo_db(work / "data" / "blat_ecolx.db")
    args = ["run", "plans/demo.json", "--backend", "local", "--set", "model.name=gate", "--set", "train.max_epochs=2"]
    first = infra_background(*args, workdir=work, log=tmp_path / "first.log")
    second = None
    try:
        exp_dir: Path = wait_for(lambda: next((work / "experiments").glob("blat-demo-*"), None), 120, "the experiment")
        wait_for(lambda: (exp_dir / "metrics" / ".gate-waiting").exists(), 180, "the training to wait at the gate")
        second = infra_background(*args, workdir=work, log=tmp_path / "second.log")
        wait_for(lambda: "following it" in (tmp_path / "second.log").read_text(), 120, "the second run to attach")
        (exp_dir / "metrics" / ".gate-open").touch()
        assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    lines = (tmp_path / "second.log").read_text().splitlines()
    assert re.fullmatch(r"experiment blat-demo-\w+: already running; following it", lines[1]), lines
    for n in (1, 2):  # epoch 1 finished before the attach, epoch 2 after
        assert len([line for line in lines if re.fullmatch(EPOCH.format(n=n) + "(  best)?", line)]) == 1, lines
    assert any(line.startswith("test: spearman ") for line in lines), lines
    assert re.fullmatch(r"experiment blat-demo-\w+ succeeded: test spearman .*", lines[-1]), lines
    assert cli("status", exp_dir.name, workdir=work).returncode == 0
