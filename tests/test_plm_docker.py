"""The `plm` embedding end to end in real containers: a tiny random ESM (tests/plm_model.py) added to the
node's model store with `infra models add`, a ridge plan on the BLAT demo trained from the store
(mounted read-only), a second plan (another seed) that reads the first one's embeddings from the
workdir's cache, and `infra predict` on the first experiment. The host builds the tiny model with
transformers, so this module is core tier; the base image must hold transformers (the core extra).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.e2e import chown_to, infra_as, labelled_containers

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.core]


@pytest.fixture
def store(run_user, monkeypatch):
    """An empty model store the run user owns (under /tmp: the run user cannot enter pytest's folders)."""
    top = Path(tempfile.mkdtemp(prefix="infra-store-", dir="/tmp"))
    os.chmod(top, 0o755)
    chown_to(run_user, top)
    monkeypatch.setenv("INFRA_MODEL_STORE", str(top / "models"))  # infra_as passes os.environ on
    yield top / "models"
    shutil.rmtree(top, ignore_errors=True)


def plm_plan(workdir: Path, name: str, seed: int) -> str:
    doc = json.loads((workdir / "plans" / "demo.json").read_text())
    doc.update(
        name=name,
        model={"name": "ridge"},
        embeddings={"name": "plm", "params": {"model": "tiny-esm", "pooling": "mean", "batch_size": 64}},
    )
    doc["data"]["limit"] = 300  # a few hundred variants keep the CPU forward pass short
    doc["train"] = {**doc["train"], "max_epochs": 2, "seed": seed}
    path = workdir / "plans" / f"{name}.json"
    path.write_text(json.dumps(doc))
    return f"plans/{name}.json"


def full_log(exp: Path) -> str:
    return "\n".join(
        p.read_text(errors="replace") for p in (exp / "container.log", exp / "logs" / "train.log") if p.exists()
    )


def test_plm_trains_from_the_store_reuses_the_cache_and_predicts(
    base_image, workdir, run_user, store, docker_client, tmp_path
):
    from tests.plm_model import make_tiny_esm

    top = Path(tempfile.mkdtemp(prefix="infra-src-", dir="/tmp"))
    try:
        source = make_tiny_esm(top, "tiny-esm")
        for path in [top, *top.rglob("*")]:
            chown_to(run_user, path)
        added = infra_as(run_user, "models", "add", "tiny-esm", str(source), "--json", workdir=workdir)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    assert added.returncode == 0, added.stderr[-2000:]
    sha = json.loads(added.stdout)["sha256"]

    first = infra_as(run_user, "run", plm_plan(workdir, "plm-a", 0), "--json", workdir=workdir)
    assert first.returncode == 0, first.stderr[-4000:]
    doc = json.loads(first.stdout)
    assert doc["state"] == "succeeded"
    exp_a = Path(doc["exp_dir"])
    assert json.loads((exp_a / "status.json").read_text())["model_sha256"] == sha
    cache = workdir / "cache" / "embeddings"
    written = sorted(p.name for p in cache.glob("*.npy"))
    assert len(written) == 1, sorted(p.name for p in cache.iterdir())
    assert "read from the embedding cache" not in full_log(exp_a)

    second = infra_as(run_user, "run", plm_plan(workdir, "plm-b", 1), "--json", workdir=workdir)
    assert second.returncode == 0, second.stderr[-4000:]
    exp_b = Path(json.loads(second.stdout)["exp_dir"])
    assert "read from the embedding cache" in full_log(exp_b)  # the first run's features, not recomputed
    assert sorted(p.name for p in cache.glob("*.npy")) == written

    inp = workdir / "variants.csv"
    inp.write_text("mutant\nH24A\nM1A\n")
    chown_to(run_user, inp)
    out = workdir / "p.csv"
    r = infra_as(run_user, "predict", doc["experiment_id"], str(inp), "--out", str(out), "--json", workdir=workdir)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout)["predicted"] >= 1
    assert labelled_containers(docker_client, workdir) == []

    node = infra_as(run_user, "node", "--json", workdir=workdir)
    assert json.loads(node.stdout)["embed_cache"]["bytes"] > 0
    pruned = infra_as(run_user, "prune", "--cache", "--json", workdir=workdir)
    assert pruned.returncode == 0, pruned.stderr[-2000:]
    assert json.loads(pruned.stdout)["cache"]["bytes"] > 0 and list(cache.iterdir()) == []
