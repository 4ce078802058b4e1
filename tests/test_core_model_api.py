"""The Python API (`runner.load_model`), its TorchScript export and the MLflow model, on real
experiments trained here: predictions equal the training's own, the export reproduces them without
infra, and `mlflow models predict` serves them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from runner.core.experiment import run_experiment
from runner.core.model_api import ExportError, MutantError, load_model
from runner.data.importer import DEMO_CSV, DEMO_TEMPLATE, build_demo_db, import_csv
from runner.errors import DataError
from runner.plan.models import Plan
from tests.helpers import REPO

pytestmark = pytest.mark.core

# (model, data) of the experiments trained once for this module: every built-in that exports, each
# with another target transform, and a classifier
KINDS = {
    "linear": ("linear", {"transform": "rank"}),
    "ridge": ("ridge", {"transform": "log"}),
    "mlp": ("mlp", {"transform": "standardize"}),
    "cnn": ("cnn", {}),
    "classifier": ("linear", {"target": "DMS_score_bin"}),
}
GOOD = ["H24A", "S2G:Q4A", ""]  # BLAT_ECOLX: H at 24, S at 2, Q at 4; "" is the wild type


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("model-api")
    db = root / "blat.db"
    build_demo_db(db)
    out = {}
    for kind, (model, data) in KINDS.items():
        plan = {
            "name": f"api-{kind}",
            "data": {"db": str(db), "limit": 600, **data},
            "model": {"name": model, **({"params": {"hidden": [8]}} if model == "mlp" else {})},
            "train": {"max_epochs": 2, "batch_size": 128},
            **({"metrics": ["auc", "spearman"]} if kind == "classifier" else {}),
        }
        run_experiment(Plan.model_validate(plan), root / kind)
        out[kind] = root / kind
    return out


def training_predictions(exp: Path) -> pd.DataFrame:
    return pd.read_parquet(exp / "artifacts/predictions.parquet")


def minimal_copy(exp: Path, dest: Path, checkpoints=("ckpts/best.ckpt",)) -> Path:
    """The folder the MLflow model holds: MODEL_FILES that exist (one checkpoint), nothing else."""
    from runner.core.mlflow_model import CHECKPOINTS, MODEL_FILES

    for rel in MODEL_FILES:
        if (exp / rel).is_file() and (rel not in CHECKPOINTS or rel in checkpoints):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(exp / rel, dest / rel)
    return dest


# --- load_model and predict -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "ridge", "classifier"])
def test_predict_gives_the_trainings_own_predictions_on_the_original_scale(trained, kind):
    exp = trained[kind]
    known = training_predictions(exp).head(200)
    m = load_model(exp)
    got = m.predict(known["mutant"].tolist())
    assert got.dtype == np.float64 and got.shape == (len(known),)
    np.testing.assert_allclose(got, known["y_pred"].to_numpy(), rtol=1e-4, atol=1e-5)


def test_a_bad_mutant_is_named_with_its_reason_or_nan_on_request(trained):
    m = load_model(trained["linear"])
    with pytest.raises(
        MutantError,
        match=r"^mutant 1 'Q24A': wild type 'Q' at position 24 does not match the template's 'H' \(and 1 more\)",
    ):
        m.predict(["H24A", "Q24A", "garbage"])
    with pytest.raises(ValueError):  # a MutantError is a ValueError too, for notebook users
        m.predict(["garbage"])
    got = m.predict(["H24A", "Q24A", "garbage"], errors="nan")
    assert np.isfinite(got[0]) and np.isnan(got[1:]).all()
    frame = m.predict_frame(["H24A", "Q24A", "garbage"])
    assert frame.columns.tolist() == ["mutant", "prediction", "error"]
    assert pd.isna(frame["error"][0]) and "does not match" in frame["error"][1] and "malformed" in frame["error"][2]
    assert frame["prediction"][0] == got[0]
    with pytest.raises(TypeError, match="a list of mutants"):
        m.predict("H24A")
    with pytest.raises(MutantError, match="mutant 1 is missing"):
        m.predict(["H24A", None])


def test_the_model_says_what_it_is(trained):
    m = load_model(trained["linear"])
    assert m.template == DEMO_TEMPLATE and m.sources == ["BLAT_ECOLX_Stiffler_2015"]
    assert (m.task, m.transform, m.model_name, m.embedding_name) == ("regression", "rank", "linear", "onehot")
    assert m.plan["model"]["name"] == "linear" and m.covariates == []
    assert repr(m).startswith(f"Model({str(trained['linear'])!r}, model='linear', embedding='onehot'")
    assert "checkpoint='best.ckpt'" in repr(m)


def test_a_minimal_copy_loads_and_falls_back_to_the_last_checkpoint(trained, tmp_path):
    exp = trained["linear"]
    full = load_model(exp).predict(GOOD)
    only_last = minimal_copy(exp, tmp_path / "last", checkpoints=("ckpts/last.ckpt",))
    m = load_model(only_last)
    assert m.checkpoint.name == "last.ckpt" and m.plan is not None
    np.testing.assert_allclose(load_model(exp, checkpoint="ckpts/last.ckpt").predict(GOOD), m.predict(GOOD))
    copy = minimal_copy(exp, tmp_path / "best")
    (copy / "config/plan.json").unlink()
    m = load_model(copy)
    assert m.plan is None
    np.testing.assert_array_equal(m.predict(GOOD), full)


def test_missing_pieces_are_named_with_what_to_do(trained, tmp_path):
    with pytest.raises(DataError, match="no such experiment directory"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no config/predict.json; give an experiment directory"):
        load_model(tmp_path / "empty")
    no_ckpt = minimal_copy(trained["linear"], tmp_path / "no-ckpt", checkpoints=())
    with pytest.raises(DataError, match=r"no checkpoint \(ckpts/best.ckpt or ckpts/last.ckpt\).*--rerun"):
        load_model(no_ckpt)
    with pytest.raises(DataError, match="checkpoint .*other.ckpt: no such file"):
        load_model(trained["linear"], checkpoint="ckpts/other.ckpt")
    # a checkpoint of a model no built-in provides: a plugin's, whose workdir was not given
    plugin = minimal_copy(trained["ridge"], tmp_path / "plugin")
    ckpt = torch.load(plugin / "ckpts/best.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["model_name"] = "my_plugin_model"
    torch.save(ckpt, plugin / "ckpts/best.ckpt")
    with pytest.raises(DataError, match="unknown model 'my_plugin_model'.*load_model\\(..., workdir=DIR\\)"):
        load_model(plugin)
    rank = minimal_copy(trained["linear"], tmp_path / "rank")
    (rank / "config/target_sorted.npy").unlink()  # the rank transform's inverse needs it
    with pytest.raises(DataError, match="no config/target_sorted.npy: the rank transform's inverse needs"):
        load_model(rank)


# --- covariates -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def augmented(tmp_path_factory) -> Path:
    """One-hot ridge with a covariate `zs` (DMS_score + noise), as tests/test_core_covariates.py."""
    folder = tmp_path_factory.mktemp("model-api-zs")
    table = pd.read_csv(DEMO_CSV)
    table["zs"] = table["DMS_score"] + np.random.default_rng(0).normal(0.0, 1.0, len(table))
    table.to_csv(folder / "blat_zs.csv", index=False)
    import_csv(folder / "blat_zs.csv", folder / "zs.db", "BLAT_ECOLX", DEMO_TEMPLATE, extra_columns=["zs"])
    data = {"db": str(folder / "zs.db"), "covariates": ["zs"], "limit": 800}
    plan = {"name": "api-zs", "data": data, "model": {"name": "ridge"}}
    run_experiment(Plan.model_validate(plan), folder / "exp")
    return folder / "exp"


def test_covariates_are_taken_from_a_frame_or_an_array_and_their_absence_is_named(augmented):
    m = load_model(augmented)
    known = training_predictions(augmented).merge(pd.read_parquet(augmented / "data/selected.parquet")[["id", "zs"]])
    known = known.head(50)
    mutants = known["mutant"].tolist()
    by_frame = m.predict(mutants, covariates=known.assign(other=1.0))  # other columns are ignored
    np.testing.assert_allclose(by_frame, known["y_pred"], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(m.predict(mutants, covariates=known[["zs"]].to_numpy()), by_frame)
    assert m.covariates == ["zs"] and "covariates=['zs']" in repr(m)
    with pytest.raises(DataError, match=r"trained with data.covariates \(zs\).*covariates="):
        m.predict(mutants)
    with pytest.raises(DataError, match="covariates: no column 'zs'"):
        m.predict(mutants, covariates=known[["mutant"]])
    with pytest.raises(DataError, match=r"covariates: shape \(49, 1\), expected \(50, 1\)"):
        m.predict(mutants, covariates=known[["zs"]].to_numpy()[1:])
    holes = known[["zs"]].to_numpy().copy()
    holes[3] = np.nan
    with pytest.raises(DataError, match="'zs' is missing .* for mutant 3"):
        m.predict(mutants, covariates=holes)
    with pytest.raises(ExportError, match=r"model 'ridge' with data.covariates \(zs\) cannot be exported"):
        m.export_torchscript(augmented / "x.pt")


# --- TorchScript ----------------------------------------------------------------------------------

# Run with -I in an empty folder, infra's package blocked (an installed infra would be importable
# otherwise): torch, the file and its sidecar are all it has.
STANDALONE = r"""
import json, sys
sys.modules["runner"] = None  # any import of runner (also from inside torch.jit.load) fails
import numpy as np, torch
try:
    import runner
    raise SystemExit("runner is importable: the check would prove nothing")
except ImportError:
    pass
out = {}
for path in sys.argv[1:]:
    side = json.load(open(path + ".json"))
    tokens = torch.from_numpy(np.load(path + ".tokens.npy"))
    module = torch.jit.load(path)
    out[path] = {"uint8": module(tokens).tolist(), "int64": module(tokens.long()).tolist(), "seq_len": side["seq_len"]}
print(json.dumps(out))
"""


def test_torchscript_export_gives_predicts_predictions_without_infra(trained, tmp_path):
    mutants = [*GOOD, *training_predictions(trained["linear"])["mutant"].head(40)]
    expected, files = {}, []
    for kind, exp in trained.items():
        m = load_model(exp)
        path = m.export_torchscript(tmp_path / kind / "model.pt")
        tokens = m.encode(mutants)
        assert tokens.dtype == np.uint8 and tokens.shape == (len(mutants), m.predictor.seq_len)
        np.save(str(path) + ".tokens.npy", tokens)
        side = json.loads(Path(str(path) + ".json").read_text())
        assert side["template"] == DEMO_TEMPLATE and side["task"] == m.task
        assert side["transform"]["name"] == m.transform and side["vocab"]["name"] == "IUPAC"
        expected[str(path)] = m.predict(mutants)
        files.append(str(path))
    proc = subprocess.run(
        [sys.executable, "-I", "-c", STANDALONE, *files], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    for path, want in expected.items():
        for dtype in ("uint8", "int64"):
            np.testing.assert_allclose(got[path][dtype], want, rtol=0, atol=1e-5, err_msg=f"{path} {dtype}")


def test_encode_refuses_a_bad_mutant_by_name(trained):
    with pytest.raises(MutantError, match="mutant 1 'Q24A'"):
        load_model(trained["cnn"]).encode(["H24A", "Q24A"])


# --- MLflow ---------------------------------------------------------------------------------------


def test_importing_the_mlflow_model_file_does_not_import_torch():
    code = "import sys, runner.core.mlflow_model as m; assert 'torch' not in sys.modules, 'torch'; print(m.MODEL_FILES)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_mlflow_model_of_a_minimal_copy_predicts_as_the_model_also_from_the_cli(trained, tmp_path):
    import mlflow

    import runner.core
    from runner.core.mlflow_model import ARTIFACT

    exp = trained["linear"]
    folder = minimal_copy(exp, tmp_path / "files")
    saved = tmp_path / "mlflow-model"
    mlflow.pyfunc.save_model(
        str(saved),
        python_model=str(Path(runner.core.__file__).parent / "mlflow_model.py"),
        artifacts={ARTIFACT: str(folder)},
        pip_requirements=["infra[core]"],
    )
    mutants = ["H24A", "S2G:Q4A", "Q24A", "", "garbage"]
    want = load_model(exp).predict_frame(mutants)
    got = mlflow.pyfunc.load_model(str(saved)).predict(pd.DataFrame({"mutant": mutants}))
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want)
    assert np.isnan(got["prediction"][2]) and "does not match" in got["error"][2]

    # the shell: a CSV (its empty cell is the wild type), in the current environment
    (tmp_path / "in.csv").write_text("mutant,note\nH24A,a\nS2G:Q4A,b\nQ24A,c\n,wild type\n")
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "predict", "-m", str(saved), "-i", str(tmp_path / "in.csv"),
         "-t", "csv", "--env-manager", "local", "-o", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text().replace("NaN", "null"))["predictions"]
    assert [r["mutant"] for r in rows] == ["H24A", "S2G:Q4A", "Q24A", ""]
    np.testing.assert_allclose([r["prediction"] for r in rows if r["error"] is None], want["prediction"][[0, 1, 3]])
    assert rows[2]["prediction"] is None and "does not match" in rows[2]["error"]


# --- the documentation's snippet ------------------------------------------------------------------


def test_the_notebook_snippet_in_the_docs_runs(trained, capsys):
    text = (REPO / "docs/python-api.md").read_text(encoding="utf-8")
    section = text.split("## In a notebook", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert re.search(r'^exp = "experiments/[^"]+".*$', snippet, re.M), "the snippet's exp line changed"
    snippet = re.sub(r'^exp = "experiments/[^"]+".*$', f"exp = {str(trained['linear'])!r}", snippet, flags=re.M)
    scope: dict = {}
    exec(compile(snippet, "docs/python-api.md", "exec"), scope)
    assert scope["frame"].columns.tolist() == ["mutant", "prediction", "error"]
    assert len(scope["scores"]) == 19 * len(DEMO_TEMPLATE) and scope["scores"].notna().all()
    assert "Model(" in capsys.readouterr().out
