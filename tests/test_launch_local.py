"""The local backend's pre-flight: a Python without the training core gets a clear exit-3 message."""

from __future__ import annotations

import importlib.util
import json

import pytest

from runner import launch
from runner.errors import EnvironmentProblem
from runner.plan import load_plan


def test_local_backend_without_core_is_environment_error(tmp_path, mini_db, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        launch.importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    loaded = load_plan("p", text=json.dumps({"name": "x", "data": {"db": str(mini_db)}, "model": {"name": "linear"}}))
    with pytest.raises(EnvironmentProblem) as info:
        launch.run(loaded, tmp_path, launch.RunOptions(backend="local"))
    assert info.value.exit_code == 3
    assert info.value.message == (
        "--backend local runs the training core in this Python, which lacks torch: "
        "install it with \"pip install 'infra[core]'\" (or use the docker backend)"
    )
    assert not list((tmp_path / "experiments").glob("*/status.json"))  # nothing created
