"""Workdir plugins: loading into infra_ext.*, registration, and errors that name the file and line."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from runner.core.embeddings import EMBEDDINGS
from runner.core.metrics import METRICS
from runner.core.models import MODELS
from runner.core.plugins import PluginError, describe_registries, load_plugins, resolve_workdir
from runner.core.registry import RegistryError
from runner.core.vocab import VOCABS

pytestmark = pytest.mark.core


@pytest.fixture
def clean_plugins():
    """Forget plugin modules and their registrations after each test."""
    before = {
        kind: set(reg.names())
        for kind, reg in {"vocab": VOCABS, "embed": EMBEDDINGS, "model": MODELS, "metric": METRICS}.items()
    }
    yield
    for name in [m for m in sys.modules if m == "infra_ext" or m.startswith("infra_ext.")]:
        del sys.modules[name]
    for kind, reg in {"vocab": VOCABS, "embed": EMBEDDINGS, "model": MODELS, "metric": METRICS}.items():
        for name in set(reg.names()) - before[kind]:
            reg.unregister(name)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


MODEL_PLUGIN = """
    import torch
    from runner.core.models import ProteinModel, register_model


    @register_model("mean_pool")
    class MeanPool(ProteinModel):
        def __init__(self, seq_len, in_dim, n_outputs=1, scale=1.0):
            super().__init__(seq_len, in_dim, n_outputs)
            self.out = torch.nn.Linear(in_dim, n_outputs)

        def forward(self, x):
            return self._out(self.out(x.mean(1)))
"""


def test_plugins_load_into_namespace_and_register(tmp_path, clean_plugins):
    write(tmp_path / "model" / "pool.py", MODEL_PLUGIN)
    write(
        tmp_path / "metrics" / "top.py",
        """
        import numpy as np
        from runner.core.metrics import register_metric

        @register_metric("top1_hit")
        def top1_hit(y_true, y_pred):
            return float(np.argmax(y_pred) == np.argmax(y_true))
    """,
    )
    write(tmp_path / "embed" / "_private.py", "raise RuntimeError('never imported')\n")
    modules = load_plugins(tmp_path)
    assert [m.__name__ for m in modules] == ["infra_ext.model.pool", "infra_ext.metrics.top"]
    assert "mean_pool" in MODELS and "top1_hit" in METRICS
    assert load_plugins(tmp_path) == modules  # idempotent
    rows = {(r["kind"], r["name"]): r for r in describe_registries()}
    assert rows[("model", "mean_pool")]["source_file"] == str(tmp_path / "model" / "pool.py")
    assert rows[("model", "mean_pool")]["builtin"] is False
    assert rows[("model", "linear")]["builtin"] is True
    assert {("embedding", "onehot"), ("split", "modulo"), ("vocab", "IUPAC"), ("metric", "auc")} <= set(rows)


def test_syntax_error_names_file_and_line(tmp_path, clean_plugins):
    bad = write(tmp_path / "model" / "broken.py", "import torch\n\ndef f(:\n    pass\n")
    with pytest.raises(PluginError) as err:
        load_plugins(tmp_path)
    assert f"{bad}:3" in str(err.value) and "SyntaxError" in str(err.value)
    assert err.value.exit_code == 1
    assert "infra_ext.model.broken" not in sys.modules


def test_runtime_error_names_the_plugin_line(tmp_path, clean_plugins):
    bad = write(tmp_path / "embed" / "oops.py", "x = 1\n\ndef g():\n    return {}['missing']\n\ng()\n")
    with pytest.raises(PluginError, match=rf"{bad}:4: KeyError"):
        load_plugins(tmp_path)


def test_duplicate_registration_names_both(tmp_path, clean_plugins):
    write(tmp_path / "model" / "a.py", MODEL_PLUGIN)
    write(tmp_path / "model" / "b.py", MODEL_PLUGIN)
    with pytest.raises(PluginError) as err:
        load_plugins(tmp_path)
    message = str(err.value)
    assert "model 'mean_pool' is registered twice" in message
    assert "a.py" in message and "b.py" in message
    with pytest.raises(RegistryError, match="registered twice"):
        MODELS.register("linear", lambda **kw: None)  # a plugin cannot shadow a built-in


def test_workdir_resolution(tmp_path, monkeypatch):
    assert resolve_workdir(tmp_path) == tmp_path
    monkeypatch.setenv("INFRA_WORKDIR", str(tmp_path / "env"))
    assert resolve_workdir(None) == tmp_path / "env"


def test_plugin_model_trains_through_the_cli(tmp_path, clean_plugins):
    from runner.core.cli import main
    from runner.data.importer import build_demo_db

    workdir = tmp_path / "wd"
    write(workdir / "model" / "pool.py", MODEL_PLUGIN)
    db = tmp_path / "blat.sqlite"
    build_demo_db(db)
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "name": "plug",
                "data": {"db": "ignored.sqlite", "limit": 300},
                "model": {"name": "mean_pool", "params": {"scale": 2.0}},
                "train": {"max_epochs": 1},
            }
        )
    )
    assert main([str(plan), "--exp-dir", str(tmp_path / "exp"), "--workdir", str(workdir), "--db", str(db)]) == 0
    metrics = json.loads((tmp_path / "exp/metrics/metrics.json").read_text())
    assert metrics["n"]["selected"] == 300
