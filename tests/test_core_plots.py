"""The plots of an experiment on real data: BLAT (single mutants, 286 aa) and GB1 (1–4 mutations, 149k)."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from runner.core import plots
from runner.core.metrics import spearman
from runner.data.importer import DEMO_CSV
from tests.conftest import SHARED_DMS

pytestmark = pytest.mark.core

GB1_RAW = SHARED_DMS / "raw" / "gb1_wu2016" / "four_mutations_full_data.csv.gz"
PNG = b"\x89PNG\r\n\x1a\n"


class Written(dict):
    """The experiment's writer as the plots see it: path → bytes, each handed over whole."""

    def __call__(self, path: Path, data: bytes) -> None:
        self[Path(path).name] = data


@pytest.fixture(scope="module")
def blat() -> pd.DataFrame:
    frame = pd.read_csv(DEMO_CSV)
    rng = np.random.default_rng(0)
    # a stand-in model: the measurement plus noise, so predicted and measured maps differ but correlate
    frame["pred"] = frame["DMS_score"] + rng.normal(0, 0.5, len(frame))
    return frame


@pytest.fixture(scope="module")
def gb1() -> pd.DataFrame:
    if not GB1_RAW.is_file():
        pytest.skip(f"the shared GB1 data ({GB1_RAW}) is not present")
    with gzip.open(GB1_RAW, "rt", newline="") as fh:
        rows = [(r["Variants"], float(r["Fitness"])) for r in csv.DictReader(fh)]
    sites, wild = (39, 40, 41, 54), "VDGV"
    mutants = [":".join(f"{w}{s}{a}" for s, w, a in zip(sites, wild, v, strict=True) if a != w) for v, _ in rows]
    frame = pd.DataFrame({"mutant": mutants, "DMS_score": [f for _, f in rows]})
    frame["mut_num"] = frame["mutant"].str.count(":") + (frame["mutant"] != "")
    frame["pred"] = frame["DMS_score"] * 0.5 + np.random.default_rng(1).normal(0, 0.3, len(frame))
    return frame


def test_single_mutant_means_match_a_plain_groupby(blat):
    labels, measured, predicted = plots.single_mutant_means(blat["mutant"], blat["DMS_score"], blat["pred"])
    assert labels[0] == "H24" and len(labels) == blat["mutant"].str[1:-1].nunique()
    for mutant in ("H24A", "E169K", "L196Y", "P181R"):
        rows = blat[blat["mutant"] == mutant]
        assert len(rows) == 1
        column = labels.index(mutant[:-1])
        row = plots.HEATMAP_AMINO_ACIDS.index(mutant[-1])
        assert measured[row, column] == pytest.approx(rows["DMS_score"].mean())
        assert predicted[row, column] == pytest.approx(rows["pred"].mean())
    assert np.isfinite(measured).sum() == blat["mutant"].nunique()


def test_only_single_mutants_enter_the_heatmap(gb1):
    labels, measured, _ = plots.single_mutant_means(gb1["mutant"], gb1["DMS_score"], gb1["pred"])
    singles = gb1[gb1["mut_num"] == 1]
    assert labels == ["V39", "D40", "G41", "V54"]
    assert np.isfinite(measured).sum() == len(singles) == 4 * 19  # every single substitution, no stop
    # no single mutant (doubles only, the wild type, a letter outside the alphabet): no heatmap
    written = Written()
    assert not plots.single_mutant_heatmap(["V39A:D40C", "", "V39X"], [1.0, 2.0, 3.0], [1, 2, 3], "DMS_score",
                                           Path("s.png"), written)  # fmt: skip
    assert written == {}


def test_every_plot_is_a_whole_png_on_real_data(blat, gb1):
    written = Written()
    epochs = [{"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.2 / (e + 1), "val_spearman": 0.5 + e / 20}
              for e in range(5)]  # fmt: skip
    plots.learning_curves(epochs, Path("learning_curves.png"), written)
    test = blat.sample(1000, random_state=0)
    kind = plots.predicted_vs_measured(test["DMS_score"], test["pred"], 0.8, "DMS_score", Path("pvm_blat.png"), written)
    assert kind == "points"
    kind = plots.predicted_vs_measured(gb1["DMS_score"], gb1["pred"], 0.6, "DMS_score", Path("pvm_gb1.png"), written)
    assert kind == "density" and len(gb1) > plots.DENSITY_THRESHOLD
    assert plots.single_mutant_heatmap(blat["mutant"], blat["DMS_score"], blat["pred"], "DMS_score",
                                       Path("single_blat.png"), written)  # fmt: skip
    assert plots.single_mutant_heatmap(gb1["mutant"], gb1["DMS_score"], gb1["pred"], "DMS_score",
                                       Path("single_gb1.png"), written)  # fmt: skip
    assert plots.per_mut_num(gb1["mut_num"].to_numpy(), gb1["DMS_score"].to_numpy(), gb1["pred"].to_numpy(),
                             spearman, Path("per_mut_num.png"), written)  # fmt: skip
    assert set(written) == {"learning_curves.png", "pvm_blat.png", "pvm_gb1.png", "single_blat.png",
                            "single_gb1.png", "per_mut_num.png"}  # fmt: skip
    assert all(data.startswith(PNG) and data.rstrip().endswith(b"IEND\xaeB`\x82") for data in written.values())


def test_no_per_mut_num_plot_for_a_single_level(blat):
    written = Written()
    assert not plots.per_mut_num(np.ones(len(blat), dtype=int), blat["DMS_score"].to_numpy(),
                                 blat["pred"].to_numpy(), spearman, Path("per_mut_num.png"), written)  # fmt: skip
    assert written == {}


def test_learning_curves_without_validation_spearman(blat):
    written = Written()
    plots.learning_curves([{"epoch": 0, "train_loss": 1.0}, {"epoch": 1, "train_loss": 0.5}], Path("lc.png"), written)
    assert written["lc.png"].startswith(PNG)


def test_learning_curves_draw_the_start_at_zero_and_star_the_kept_model():
    # the reported run: the kept start (ridge fit, 0.7697) is above every trained epoch, none of which
    # is the model; epochs count from 1 as in the logs, the start sits at 0
    start = {"val_loss": 0.52, "val_spearman": 0.7697, "val": {"spearman": 0.7697}}
    epochs = [
        {"epoch": 0, "train_loss": 0.4, "val_loss": 0.53, "val_spearman": 0.7607, "val": {"spearman": 0.7607}},
        {"epoch": 1, "train_loss": 0.3, "val_loss": 0.55, "val_spearman": 0.7176, "val": {"spearman": 0.7176}},
        {"epoch": 2, "train_loss": 0.2, "val_loss": 0.56, "val_spearman": None, "val": {"spearman": None}},
    ]
    assert plots.curve(epochs, "val_spearman", start) == ([0, 1, 2], [0.7697, 0.7607, 0.7176])  # undefined: left out
    assert plots.curve(epochs, "train_loss") == ([1, 2, 3], [0.4, 0.3, 0.2])
    kept = {"model": "start", "epoch": None, "by": "val_spearman", "value": 0.7697}
    assert plots.kept_point(kept, "ridge fit") == ("val_spearman", 0, 0.7697, "kept: start (ridge fit) 0.770")
    assert plots.kept_point({**kept, "model": "epoch", "epoch": 1, "value": 0.7176}) == (
        "val_spearman", 2, 0.7176, "kept: epoch 2 0.718",
    )  # fmt: skip
    assert plots.kept_point({**kept, "model": "closed_form", "by": "val_loss", "value": 0.52}) == (
        "val_loss", 1, 0.52, "kept: closed-form fit 0.520",
    )  # fmt: skip
    written = Written()
    plots.learning_curves(epochs, Path("lc.png"), written, start=start, kept=kept, start_name="ridge fit")
    plots.learning_curves(epochs, Path("lc_loss.png"), written, start=start,
                          kept={**kept, "by": "val_loss", "value": 0.52})  # fmt: skip
    assert all(written[name].startswith(PNG) for name in ("lc.png", "lc_loss.png"))
