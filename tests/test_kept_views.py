"""The kept model and undefined metrics as the host shows them (issue 21): the run view's summary and the
MLflow tag. The core's records are untrusted input here: only their known shapes are shown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.cli import progress
from runner.cli.progress import Kept, kept_text, undefined_text
from runner.run.records import Experiment
from runner.run.tracking import kept_tag

START = {
    "model": "start",
    "epoch": None,
    "by": "val_spearman",
    "value": 0.7697,
    "best_trained": {"epoch": 2, "value": 0.7607, "start_z": 0.41},
    "why": "no trained epoch clearly above the fitted start (ridge fit): best epoch 3 val_spearman 0.7607, z 0.41",
    "warning": None,
}


def test_kept_text_says_what_the_run_delivers():
    assert kept_text(Kept.from_doc(START)) == (
        "kept: start (val_spearman 0.7697); best trained epoch 3, val_spearman 0.7607, not clearly above it (z 0.41)"
    )
    by_loss = {**START, "by": "val_loss", "value": 0.344, "best_trained": {"epoch": 6, "value": 0.34, "start_z": None}}
    assert kept_text(Kept.from_doc(by_loss)) == (
        "kept: start (val_loss 0.3440); best trained epoch 7, val_loss 0.3400, not clearly better than it"
    )
    epoch = {**START, "model": "epoch", "epoch": 3, "value": 0.78, "best_trained": {"epoch": 3, "value": 0.78,
                                                                                      "start_z": 2.31}}  # fmt: skip
    assert (
        kept_text(Kept.from_doc(epoch)) == "kept: epoch 4 (val_spearman 0.7800), 2.31 standard errors above the start"
    )
    closed = {**START, "model": "closed_form", "best_trained": None}
    assert kept_text(Kept.from_doc(closed)) == "kept: the closed-form fit (val_spearman 0.7697)"
    undefined = {**START, "value": None, "best_trained": None}
    assert (
        kept_text(Kept.from_doc(undefined))
        == "kept: start (val_spearman undefined); no trained epoch has a val_spearman"
    )


@pytest.mark.parametrize(
    "doc",
    [None, [], {"model": "best"}, {**START, "by": "val spearman\x1b[2J"}, {**START, "by": 3}, {**START, "model": 1}],
)
def test_a_kept_record_of_another_shape_is_not_shown(doc):
    assert Kept.from_doc(doc) is None


def test_numbers_of_the_wrong_kind_are_dropped_not_shown():
    odd = {
        **START,
        "value": "0.9",
        "epoch": True,
        "best_trained": {"epoch": -1, "value": float("nan"), "start_z": 1e999},
    }
    assert Kept.from_doc(odd) == Kept("start", "val_spearman")


def test_undefined_text_names_each_null_metric_with_its_reason():
    assert undefined_text({"test.spearman": "constant predictions", "train.mse": "x", "val.pearson": 3}) == (
        "undefined: test spearman (constant predictions)"
    )
    assert undefined_text({"test.spearman": "constant\x1b[31m predictions"}) == (
        "undefined: test spearman (constant predictions)"
    )
    assert undefined_text({}) is None and undefined_text(["x"]) is None


def test_the_plain_view_ends_with_the_kept_line_and_the_undefined_metrics(tmp_path, capsys):
    exp = tmp_path / "experiments" / "demo-1"
    (exp / "logs").mkdir(parents=True)
    lines = [
        {"event": "progress", "phase": "train", "max_epochs": 3},
        {"event": "epoch", "epoch": 0, "train_loss": 0.4, "val_loss": 0.5, "val_spearman": 0.7607, "best": False},
        {"event": "progress", "phase": "kept", **START},
        {"event": "progress", "phase": "done", "test": {"spearman": None, "mse": 0.2},
         "undefined": {"test.spearman": "constant predictions"}},
    ]  # fmt: skip
    (exp / "logs/events.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    view = progress.RunView("plain", tmp_path)
    view.event({"event": "attached", "experiment_id": "demo-1", "state": "running"})
    view.finish({"test": {"spearman": None, "mse": 0.2}, "val": {"spearman": 0.77}})
    assert capsys.readouterr().err.splitlines()[-4:] == [
        "val: spearman 0.7700",
        "test: mse 0.2000",
        "kept: start (val_spearman 0.7697); best trained epoch 3, val_spearman 0.7607, not clearly above it (z 0.41)",
        "undefined: test spearman (constant predictions)",
    ]


@pytest.mark.parametrize(
    "kept,tag",
    [
        (START, "start"),
        ({**START, "model": "closed_form"}, "closed_form"),
        ({**START, "model": "epoch", "epoch": 3}, "epoch 3"),
        ({**START, "model": "epoch", "epoch": "3"}, None),
        ({**START, "model": "best"}, None),
        ("start", None),
    ],
)
def test_the_mlflow_tag_names_the_kept_model(tmp_path: Path, kept, tag):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/metrics.json").write_text(json.dumps({"kept": kept}))
    assert kept_tag(Experiment(tmp_path)) == tag
