"""The built-in `plm` embedding on a tiny random-initialised ESM from a real model store: its pooled
features against a direct transformers computation, the embedding cache (miss, hit, corrupt file,
two processes at once), real trainings and predictions, and the models that cannot take pooled features."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from runner.core import plm
from runner.core.cli import main as train_main
from runner.core.predict import main as predict_main
from runner.core.vocab import get_vocab_processor
from tests.e2e import wait_for
from tests.plm_model import make_tiny_esm

pytestmark = pytest.mark.core

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = "MSIQHFRVALIPFFAAFCLPVFAHPETLVKVKDAEDQLGARVGYIELDLNSGKILE"
OTHER = "MKTAYIAKQRQISFVKSHFSRQ"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models")
    make_tiny_esm(path, "tiny-esm")
    return path


@pytest.fixture
def env(store, tmp_path, monkeypatch) -> Path:
    """The model store and a fresh embedding cache, as the host hands them to the core."""
    cache = tmp_path / "cache" / "embeddings"
    monkeypatch.setenv(plm.ENV_STORE, str(store))
    monkeypatch.setenv(plm.ENV_CACHE, str(cache))
    return cache


def _variants() -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    """Token matrix of variants of two templates of different lengths (with wild types), their
    templates, each row's source and the sequences."""
    rows, source = [], []
    for code, template in enumerate([TEMPLATE, OTHER]):
        rows.append(template)
        source.append(code)
        for i, pos in enumerate(range(2, len(template), 3)):
            seq = list(template)
            seq[pos] = "ACDEFGHIKLMNPQRSTVWY"[(i * 7) % 20]
            if i % 2:
                seq[pos - 1] = "W"
            rows.append("".join(seq))
            source.append(code)
    vocab = get_vocab_processor("IUPAC")
    return vocab.encode(rows), [TEMPLATE, OTHER], np.array(source), rows


def _direct(store: Path, sequences: list[str], templates: list[str], pooling: str) -> np.ndarray:
    """Features computed the plain way: one sequence at a time through `model(**batch, output_hidden_states=True)`."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = store / "tiny-esm"
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False).eval()
    out = []
    with torch.no_grad():
        for seq, template in zip(sequences, templates, strict=True):
            batch = tokenizer(seq, return_tensors="pt")
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1][0, 1:-1]
            positions = [i for i, (a, b) in enumerate(zip(seq, template, strict=True)) if a != b]
            if pooling == "mutated" and positions:
                hidden = hidden[positions]
            out.append(hidden.mean(0).numpy())
    return np.stack(out)


def _embedding(pooling: str = "mean", batch_size: int = 32, layer: int = -1):
    return plm.PLMEmbedding(
        get_vocab_processor("IUPAC"), "tiny-esm", layer=layer, pooling=pooling, batch_size=batch_size
    )


@pytest.mark.parametrize("pooling", ["mean", "mutated"])
def test_pooled_features_equal_a_direct_model_computation(store, env, monkeypatch, pooling):
    monkeypatch.delenv(plm.ENV_CACHE)  # computed, not kept: the arithmetic alone
    tokens, templates, source, sequences = _variants()
    expected = _direct(store, sequences, [templates[s] for s in source], pooling)
    results = []
    for batch_size in (1, 5, 64):  # batches of mixed lengths and padding, in length order
        embed = _embedding(pooling, batch_size)
        embed.prepare(tokens, templates, source)
        out = embed(torch.from_numpy(tokens))
        assert tuple(out.shape) == (len(tokens), 1, 32)
        results.append(out[:, 0].numpy())
    for got in results:
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    if pooling == "mutated":  # a wild-type row has no mutated position: mean pooling
        mean = _direct(store, sequences[:1], templates[:1], "mean")
        np.testing.assert_allclose(results[0][:1], mean, atol=1e-5)


def test_cache_miss_then_hit_loads_no_model(env):
    tokens, templates, source, _ = _variants()
    loads = plm.model_loads()
    first = _embedding()
    first.prepare(tokens, templates, source)
    assert plm.model_loads() == loads + 1
    (npy,) = env.glob("*.npy")
    meta = json.loads(npy.with_suffix(".json").read_text())
    assert meta["n"] == len(tokens) and meta["dim"] == 32 and meta["model"] == "tiny-esm"
    assert meta["layer"] == -1 and meta["pooling"] == "mean" and meta["seconds"] >= 0
    assert not list(env.glob(".*.tmp"))  # written atomically: no temporary file left

    second = _embedding()
    second.prepare(tokens, templates, source)
    assert plm.model_loads() == loads + 1  # the hit read the file: no model was loaded
    batch = torch.from_numpy(tokens[3:9])
    np.testing.assert_array_equal(first(batch).numpy(), second(batch).numpy())

    # another layer, another pooling or other sequences are other keys
    _embedding(layer=0).prepare(tokens, templates, source)
    _embedding("mutated").prepare(tokens, templates, source)
    _embedding().prepare(tokens[:5], templates, source[:5])
    assert len(list(env.glob("*.npy"))) == 4


def test_mutated_pooling_key_covers_the_templates(env):
    tokens, templates, source, _ = _variants()
    _embedding("mutated").prepare(tokens, templates, source)
    shifted = [OTHER.replace("M", "A", 1), OTHER]  # the same sequences against another wild type
    _embedding("mutated").prepare(tokens[:1], shifted[:1], source[:1])
    _embedding("mutated").prepare(tokens[:1], templates[:1], source[:1])
    assert len(list(env.glob("*.npy"))) == 3


@pytest.mark.parametrize("damage", ["garbage", "nan", "shape"])
def test_a_corrupt_cache_file_is_recomputed(env, caplog, damage):
    tokens, templates, source, _ = _variants()
    embed = _embedding()
    embed.prepare(tokens, templates, source)
    (npy,) = env.glob("*.npy")
    good = np.load(npy).copy()
    if damage == "garbage":
        npy.write_bytes(b"\x93NUMPY not really")
    elif damage == "nan":
        np.save(npy, np.full_like(good, np.nan))
    else:
        np.save(npy, good[:-1])
    loads = plm.model_loads()
    again = _embedding()
    with caplog.at_level("WARNING", logger="runner.core.plm"):
        again.prepare(tokens, templates, source)
    assert plm.model_loads() == loads + 1  # computed again
    assert any("unusable" in r.getMessage() and "computing it again" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(np.load(npy), good, atol=1e-6)  # and replaced


CONCURRENT = textwrap.dedent(
    """
    import json, logging, os, sys, pathlib
    import numpy as np
    from runner.core import plm
    from runner.core.vocab import get_vocab_processor
    from tests.test_core_plm import _variants

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    hold = sys.argv[1]
    if hold != "-":
        real = plm.pool_features

        def held(*args, **kwargs):  # inside the computation, under the lock, until the test says go
            pathlib.Path(hold + ".inside").touch()
            while not os.path.exists(hold + ".go"):
                import select; select.select([], [], [], 0.01)
            return real(*args, **kwargs)

        plm.pool_features = held
    tokens, templates, source, _ = _variants()
    embed = plm.PLMEmbedding(get_vocab_processor("IUPAC"), "tiny-esm")
    embed.prepare(tokens, templates, source)
    import torch
    out = embed(torch.from_numpy(tokens))[:, 0].numpy()
    np.save(sys.argv[2], out)
    print(json.dumps({"loads": plm.model_loads()}), flush=True)
    """
)


def test_two_processes_computing_one_key_compute_it_once(env, tmp_path):
    script = tmp_path / "embed.py"
    script.write_text(CONCURRENT)
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    gate = str(tmp_path / "gate")
    first = subprocess.Popen(
        [sys.executable, str(script), gate, str(tmp_path / "a.npy")],
        cwd=REPO,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    second = None
    try:
        wait_for(lambda: Path(gate + ".inside").exists() or first.poll() is not None, 120, "the first computation")
        assert first.poll() is None, first.communicate()
        # the second starts while the first holds the lock inside its computation
        second = subprocess.Popen(
            [sys.executable, "-u", str(script), "-", str(tmp_path / "b.npy")],
            cwd=REPO,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        waiting = []
        for line in second.stderr:  # its log (stderr): it says it waits for the lock
            waiting.append(line)
            if "waiting for" in line:
                break
        assert any("waiting for" in line for line in waiting), "".join(waiting)
        Path(gate + ".go").touch()
        out_a, err_a = first.communicate(timeout=120)
        out_b, err_b = second.communicate(timeout=120)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert first.returncode == 0, err_a
    assert second.returncode == 0, err_b
    assert json.loads(out_a)["loads"] == 1
    assert json.loads(out_b)["loads"] == 0  # it waited and read what the first wrote
    assert "written by another run meanwhile" in err_b
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    assert len(list(env.glob("*.npy"))) == 1


def _plan(path: Path, db: Path, model: str, **embedding) -> Path:
    plan = {
        "name": f"plm-{model}",
        "data": {"db": str(db), "limit": 400},
        "model": {"name": model, "params": {"hidden": [32]} if model == "mlp" else {}},
        "embeddings": {"name": "plm", "params": {"model": "tiny-esm", "batch_size": 16, **embedding}},
        "train": {"max_epochs": 2, "batch_size": 64},
    }
    path.write_text(json.dumps(plan))
    return path


def test_local_trainings_share_the_cache_and_predict_reads_it(env, tmp_path, blat_db, capsys):
    loads = plm.model_loads()
    for model in ("ridge", "mlp"):
        plan = _plan(tmp_path / f"{model}.json", blat_db, model)
        assert train_main([str(plan), "--exp-dir", str(tmp_path / model)]) == 0, capsys.readouterr().err
        metrics = json.loads((tmp_path / model / "metrics/metrics.json").read_text())
        rho = metrics["test"]["spearman"]
        assert isinstance(rho, float) and math.isfinite(rho), metrics
    assert plm.model_loads() == loads + 1  # the first training computed, the second read the cache
    assert len(list(env.glob("*.npy"))) == 1
    log = (tmp_path / "mlp/logs/train.log").read_text()
    assert "features read from the embedding cache" in log and "loading model" not in log
    # the checkpoint holds the head and the weights' hash, never the pLM's weights
    state = torch.load(tmp_path / "mlp/ckpts/best.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert not any(k.startswith("embed.") and k != "embed.weights_sha256" for k in state)

    # predict on variants the training saw: read from the cache, no model loaded, the training's scores
    preds = pd.read_parquet(tmp_path / "mlp/artifacts/predictions.parquet")
    known = preds[preds["mutant"].str.len() > 0].head(20)
    (tmp_path / "in.csv").write_text("mutant\n" + "\n".join(known["mutant"]) + "\n")
    out = tmp_path / "out.csv"
    args = ["--exp-dir", str(tmp_path / "mlp"), "--checkpoint", str(tmp_path / "mlp/ckpts/best.ckpt")]
    capsys.readouterr()
    assert predict_main([*args, "--input", str(tmp_path / "in.csv"), "--out", str(out)]) == 0
    assert plm.model_loads() == loads + 1
    got = pd.read_csv(out)
    np.testing.assert_allclose(got["prediction"], known["y_pred"], rtol=1e-4, atol=1e-4)

    # a new variant is computed (the model loaded once), and scored
    (tmp_path / "new.csv").write_text("mutant\nM1W:S2W:I3W\n")
    assert predict_main([*args, "--input", str(tmp_path / "new.csv"), "--out", str(out)]) == 0
    assert plm.model_loads() == loads + 2
    assert math.isfinite(pd.read_csv(out)["prediction"][0])


def test_predict_refuses_weights_changed_in_the_store(env, tmp_path, blat_db, capsys, monkeypatch):
    plan = _plan(tmp_path / "plan.json", blat_db, "ridge")
    assert train_main([str(plan), "--exp-dir", str(tmp_path / "exp")]) == 0
    changed = tmp_path / "store2"
    make_tiny_esm(changed, "tiny-esm", seed=1)  # same name, other weights
    monkeypatch.setenv(plm.ENV_STORE, str(changed))
    (tmp_path / "in.csv").write_text("mutant\nM1W\n")
    args = ["--exp-dir", str(tmp_path / "exp"), "--checkpoint", str(tmp_path / "exp/ckpts/best.ckpt")]
    capsys.readouterr()
    assert predict_main([*args, "--input", str(tmp_path / "in.csv"), "--out", str(tmp_path / "o.csv")]) == 2
    err = capsys.readouterr().err
    assert "are not those this experiment was trained with" in err and "tiny-esm" in err


def test_cnn_refuses_pooled_features(env, tmp_path, blat_db, capsys):
    plan = _plan(tmp_path / "plan.json", blat_db, "cnn")
    assert train_main([str(plan), "--exp-dir", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if "error" in x]
    assert any(
        "model 'cnn' needs per-residue features; use a one-hot/BLOSUM embedding or an embedding plugin "
        "that keeps positions" in x
        for x in line
    ), err


@pytest.mark.parametrize(
    "params,needle",
    [
        ({"model": "absent"}, "no model 'absent' in the model store"),
        ({"model": "../tiny-esm"}, "is not a model store name"),
        ({"model": "tiny-esm", "pooling": "max"}, "embeddings.params.pooling: must be one of mean, mutated"),
        ({"model": "tiny-esm", "layer": 7}, "embeddings.params.layer: 7 is outside -3..2"),
    ],
)
def test_bad_plm_params_are_one_line_errors(env, tmp_path, blat_db, capsys, params, needle):
    plan = _plan(tmp_path / "plan.json", blat_db, "ridge")
    doc = json.loads(plan.read_text())
    doc["embeddings"]["params"] = params
    plan.write_text(json.dumps(doc))
    assert train_main([str(plan), "--exp-dir", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err


def test_a_missing_model_store_is_named(env, tmp_path, blat_db, capsys, monkeypatch):
    monkeypatch.delenv(plm.ENV_STORE)
    plan = _plan(tmp_path / "plan.json", blat_db, "ridge")
    assert train_main([str(plan), "--exp-dir", str(tmp_path / "exp")]) == 2
    assert "INFRA_MODEL_STORE is not set" in capsys.readouterr().err


def test_rows_added_in_steps_keep_their_own_features():
    """The lookup that memoises rows computed on the fly (review of issue 24: a second `add` paired the
    known rows' features with the new rows' tokens)."""
    index = plm.RowIndex(1)
    steps = [([[1, 2, 3]], [10.0]), ([[4, 5], [6, 7, 8, 9]], [20.0, 30.0]), ([[1, 2, 4]], [40.0])]
    for rows, values in steps:
        width = max(len(r) for r in rows)
        tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.uint8)
        index.add(tokens, torch.tensor(values)[:, None])
    for rows, values in steps:
        for row, value in zip(rows, values, strict=True):
            idx, found = index.find(torch.tensor([row], dtype=torch.uint8))
            assert bool(found[0]) and float(index.features[idx[0], 0]) == value, (row, value)
    _, found = index.find(torch.tensor([[9, 9]], dtype=torch.uint8))
    assert not bool(found[0])
