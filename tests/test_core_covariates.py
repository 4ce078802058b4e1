"""`data.covariates` through real trainings: extra numeric columns of a real SQLite database (imported
with `--extra-columns`) appended to the embedding, standardised on the training rows, stored in the
checkpoint and applied again by `infra predict` to the covariates of its input file."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from runner.core import plm
from runner.core.cli import main as train_main
from runner.core.metrics import spearman
from runner.core.predict import main as predict_main
from runner.data.importer import DEMO_CSV, DEMO_TEMPLATE, import_csv
from tests.conftest import make_db
from tests.plm_model import make_tiny_esm

pytestmark = pytest.mark.core


@pytest.fixture(scope="module")
def zs_db(tmp_path_factory) -> Path:
    """The bundled BLAT scan imported with an extra column `zs` = DMS_score + N(0, 1) noise: a stand-in
    for a zero-shot score that tracks fitness, but only partly (its Spearman with the score is ~0.7)."""
    folder = tmp_path_factory.mktemp("zs")
    table = pd.read_csv(DEMO_CSV)
    table["zs"] = table["DMS_score"] + np.random.default_rng(0).normal(0.0, 1.0, len(table))
    table.to_csv(folder / "blat_zs.csv", index=False)
    import_csv(folder / "blat_zs.csv", folder / "blat.sqlite", "BLAT_ECOLX", DEMO_TEMPLATE, extra_columns=["zs"])
    return folder / "blat.sqlite"


def _plan(path: Path, db: Path, model: str = "ridge", covariates=("zs",), **data) -> Path:
    plan = {
        "name": f"cov-{model}",
        "data": {"db": str(db), "covariates": list(covariates), **data},
        "model": {"name": model, "params": {"hidden": [16]} if model == "mlp" else {}},
        "train": {"max_epochs": 2, "batch_size": 256},
    }
    path.write_text(json.dumps(plan))
    return path


@pytest.fixture(scope="module")
def trained(zs_db, tmp_path_factory) -> dict[str, Path]:
    """One-hot ridge on the BLAT set, with and without the `zs` covariate, same split."""
    folder = tmp_path_factory.mktemp("trained")
    out = {}
    for name, covariates in (("plain", ()), ("augmented", ("zs",))):
        plan = _plan(folder / f"{name}.json", zs_db, covariates=covariates)
        assert train_main([str(plan), "--exp-dir", str(folder / name)]) == 0
        out[name] = folder / name
    return out


def _test_spearman(exp: Path) -> float:
    return json.loads((exp / "metrics/metrics.json").read_text())["test"]["spearman"]


def test_augmented_onehot_ridge_beats_onehot_ridge_and_the_covariate_alone(trained):
    # Hsu et al. 2022's augmented model: one-hot ridge learns per-site effects, the covariate carries
    # per-variant information the one-hot cannot (here: the true score, blurred by noise of about its
    # own spread). Together they must rank the held-out variants better than either alone; if the
    # covariate did not reach the model, or reached it unstandardised so ridge shrank it away, the
    # augmented run would equal the plain one.
    plain, augmented = _test_spearman(trained["plain"]), _test_spearman(trained["augmented"])
    frame = pd.read_parquet(trained["augmented"] / "data/selected.parquet").set_index("id")
    test_ids = np.load(trained["augmented"] / "splits/test.npy")
    np.testing.assert_array_equal(test_ids, np.load(trained["plain"] / "splits/test.npy"))  # same rows
    alone = spearman(frame.loc[test_ids, "DMS_score"].to_numpy(), frame.loc[test_ids, "zs"].to_numpy())
    assert augmented > plain + 0.03, (plain, augmented)
    assert augmented > alone + 0.03, (alone, augmented)


def test_standardisation_uses_the_training_rows_only_and_is_in_the_checkpoint(trained):
    exp = trained["augmented"]
    frame = pd.read_parquet(exp / "data/selected.parquet").set_index("id")
    train = frame.loc[np.load(exp / "splits/train.npy"), "zs"].to_numpy(np.float64)
    everything = frame["zs"].to_numpy(np.float64)
    state = torch.load(exp / "ckpts/best.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    mean, std = state["embed.covariate_mean"].numpy(), state["embed.covariate_std"].numpy()
    np.testing.assert_allclose(mean, [train.mean()], rtol=1e-12)
    np.testing.assert_allclose(std, [train.std()], rtol=1e-12)
    assert not np.isclose(mean[0], everything.mean(), rtol=1e-6)  # the test and val rows did not count


def test_predict_reads_the_covariates_from_the_input_file(trained, tmp_path, capsys):
    exp = trained["augmented"]
    preds = pd.read_parquet(exp / "artifacts/predictions.parquet")
    frame = pd.read_parquet(exp / "data/selected.parquet")
    known = preds.merge(frame[["id", "zs"]], on="id").head(30)
    args = ["--exp-dir", str(exp), "--checkpoint", str(exp / "ckpts/best.ckpt")]
    out = tmp_path / "out.csv"
    known[["mutant", "zs"]].to_csv(tmp_path / "in.csv", index=False)
    assert predict_main([*args, "--input", str(tmp_path / "in.csv"), "--out", str(out)]) == 0, capsys.readouterr()
    np.testing.assert_allclose(pd.read_csv(out)["prediction"], known["y_pred"], rtol=1e-4, atol=1e-4)

    # the covariate is used: a higher zs, all else equal, scores higher (its ridge weight is positive)
    raised = known[["mutant", "zs"]].assign(zs=known["zs"] + 2.0)
    raised.to_csv(tmp_path / "raised.csv", index=False)
    assert predict_main([*args, "--input", str(tmp_path / "raised.csv"), "--out", str(out)]) == 0
    assert (pd.read_csv(out)["prediction"].to_numpy() > known["y_pred"].to_numpy()).all()

    # no column, a missing value, or --saturation (no values to give): one line each, exit 2, no output
    capsys.readouterr()
    (tmp_path / "bare.csv").write_text("mutant\nH24A\n")
    (tmp_path / "hole.csv").write_text("mutant,zs\nH24A,0.5\nH24C,\n")
    cases = [
        (["--input", str(tmp_path / "bare.csv")], "no column 'zs': the experiment was trained with data.covariates"),
        (["--input", str(tmp_path / "hole.csv")], "column 'zs' is missing (empty, NaN or infinite) in 1 row(s)"),
        (["--saturation"], "--saturation: the experiment was trained with data.covariates (zs)"),
    ]
    for extra, needle in cases:
        target = tmp_path / "refused.csv"
        assert predict_main([*args, *extra, "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
        assert not target.exists()


def _mini_db(path: Path, columns: dict[str, list], extra_rows: list[tuple] = ()) -> Path:
    """The mini BLAT database of conftest plus `extra_rows` (mutant, score), with extra mutations
    columns (values per row, in id order)."""
    make_db(path)
    conn = sqlite3.connect(path)
    try:
        for mutant, score in extra_rows:
            conn.execute(
                "INSERT INTO mutations(source, mutant, mut_num, DMS_score, DMS_score_bin) VALUES (1, ?, 1, ?, 1)",
                (mutant, score),
            )
        ids = [r[0] for r in conn.execute("SELECT id FROM mutations ORDER BY id")]
        for name, values in columns.items():
            conn.execute(f'ALTER TABLE mutations ADD COLUMN "{name}" NUMERIC')
            conn.executemany(f'UPDATE mutations SET "{name}" = ? WHERE id = ?', list(zip(values, ids, strict=True)))
        conn.commit()
    finally:
        conn.close()
    return path


def _run_refused(plan: Path, exp: Path, capsys) -> str:
    assert train_main([str(plan), "--exp-dir", str(exp)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


def test_a_missing_covariate_is_refused_naming_the_column_the_count_and_the_fix(tmp_path, capsys):
    db = _mini_db(tmp_path / "mini.sqlite", {"zs": [0.1, None, 0.3, None, 0.5, 0.6]})
    err = _run_refused(_plan(tmp_path / "plan.json", db), tmp_path / "exp", capsys)
    assert "data.covariates: column 'zs' is missing (NULL, NaN or infinite) in 2 of the 6 selected rows" in err
    assert '{"column": "zs", "op": "not_null"}' in err
    # the fix the message gives works
    where = [{"column": "zs", "op": "not_null"}]
    plan = _plan(tmp_path / "fixed.json", db, where=where)
    doc = json.loads(plan.read_text())
    doc["split"] = {"test_fraction": 0.25, "val_fraction": 0.0}
    plan.write_text(json.dumps(doc))
    assert train_main([str(plan), "--exp-dir", str(tmp_path / "fixed")]) == 0, capsys.readouterr().err


def test_one_sequence_with_different_covariates_is_refused(tmp_path, capsys):
    # a second H24A row: the same sequence twice, with another zs
    db = _mini_db(tmp_path / "mini.sqlite", {"zs": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 9.0]}, [("H24A", -0.2)])
    err = _run_refused(_plan(tmp_path / "plan.json", db), tmp_path / "exp", capsys)
    assert "data.covariates: 1 sequence(s) appear in several rows with different covariate values" in err


def test_cnn_with_covariates_is_refused(tmp_path, capsys):
    db = _mini_db(tmp_path / "mini.sqlite", {"zs": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]})
    err = _run_refused(_plan(tmp_path / "plan.json", db, model="cnn"), tmp_path / "exp", capsys)
    assert "data.covariates: model 'cnn' convolves over residue positions" in err


def test_more_covariates_than_channels_of_a_per_position_embedding_is_refused(tmp_path, capsys):
    names = [f"c{i}" for i in range(25)]  # blosum62 has 24 channels: one extra position holds 24
    db = _mini_db(tmp_path / "mini.sqlite", {n: [float(i), 1.0, 2.0, 3.0, 4.0, 5.0] for i, n in enumerate(names)})
    plan = _plan(tmp_path / "plan.json", db, covariates=names)
    doc = json.loads(plan.read_text())
    doc["embeddings"] = {"name": "blosum62"}
    plan.write_text(json.dumps(doc))
    err = _run_refused(plan, tmp_path / "exp", capsys)
    assert "data.covariates: 25 covariates do not fit the one extra position of embedding 'blosum62'" in err


def test_an_unknown_covariate_column_is_refused_by_the_core(tmp_path, capsys):
    db = _mini_db(tmp_path / "mini.sqlite", {"zs": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]})
    err = _run_refused(_plan(tmp_path / "plan.json", db, covariates=["zz"]), tmp_path / "exp", capsys)
    assert "data.covariates[0]: 'zz' is not an extra column of the mutations table (extra columns: zs)" in err


def test_plm_features_with_a_covariate_train_and_predict(zs_db, tmp_path, monkeypatch, capsys):
    store = tmp_path / "models"
    make_tiny_esm(store, "tiny-esm")
    monkeypatch.setenv(plm.ENV_STORE, str(store))
    monkeypatch.setenv(plm.ENV_CACHE, str(tmp_path / "cache"))
    plan = _plan(tmp_path / "plan.json", zs_db, model="mlp", limit=400)
    doc = json.loads(plan.read_text())
    doc["embeddings"] = {"name": "plm", "params": {"model": "tiny-esm", "batch_size": 16}}
    plan.write_text(json.dumps(doc))
    exp = tmp_path / "exp"
    assert train_main([str(plan), "--exp-dir", str(exp)]) == 0, capsys.readouterr().err
    rho = _test_spearman(exp)
    assert isinstance(rho, float) and math.isfinite(rho)
    hidden = json.loads((store / "tiny-esm/config.json").read_text())["hidden_size"]
    ckpt = torch.load(exp / "ckpts/best.ckpt", map_location="cpu", weights_only=True)
    # pooled features: the covariate is one more channel of the single position, [B, 1, C + 1]
    assert ckpt["hyper_parameters"]["covariates"] == ["zs"]
    assert "embed.inner.weights_sha256" in ckpt["state_dict"]
    weights = [v for k, v in ckpt["state_dict"].items() if k.startswith("model.") and v.ndim == 2]
    assert any(w.shape[1] == hidden + 1 for w in weights), [tuple(w.shape) for w in weights]

    preds = pd.read_parquet(exp / "artifacts/predictions.parquet")
    frame = pd.read_parquet(exp / "data/selected.parquet")
    known = preds.merge(frame[["id", "zs"]], on="id").head(10)
    known[["mutant", "zs"]].to_csv(tmp_path / "in.csv", index=False)
    args = ["--exp-dir", str(exp), "--checkpoint", str(exp / "ckpts/best.ckpt")]
    assert predict_main([*args, "--input", str(tmp_path / "in.csv"), "--out", str(tmp_path / "o.csv")]) == 0
    np.testing.assert_allclose(pd.read_csv(tmp_path / "o.csv")["prediction"], known["y_pred"], rtol=1e-4, atol=1e-4)
