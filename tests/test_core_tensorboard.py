"""What TensorBoard shows of a run (issue 25): every validation metric per epoch, the test metrics once at
the end, and the resolved plan as hparams, so the HParams tab compares a sweep. Real trainings on the
bundled BLAT_ECOLX data; the event files are read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from runner.core.cli import main, run_point
from runner.core.experiment import run_experiment
from runner.core.shared import SharedData
from runner.core.training import Cancelled, GracefulStop
from runner.data.importer import DEMO_SOURCE
from runner.plan.issues import plan_from_document
from tests.conftest import make_proteingym_folder

pytestmark = pytest.mark.core

METRICS = ["spearman", "pearson", "mse", "rmse", "mae", "ndcg"]


def plan_doc(db: Path, name: str, **train) -> dict:
    return {
        "name": name,
        "data": {"db": str(db), "dataset": DEMO_SOURCE, "limit": 800},
        "model": {"name": "mlp"},
        "train": {"max_epochs": 2, "batch_size": 128, **train},
        "metrics": METRICS,
        "tracking": {"mlflow_uri": "http://127.0.0.1:9/", "experiment": "not-contacted"},
    }


def write(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def read_json(exp: Path, name: str):
    return json.loads((exp / name).read_text())


def epochs(exp: Path) -> list[dict]:
    return [json.loads(line) for line in (exp / "metrics/metrics.jsonl").read_text().splitlines()]


def board(version: Path) -> EventAccumulator:
    acc = EventAccumulator(str(version), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def hparams(acc: EventAccumulator) -> tuple[dict, set[str]] | None:
    """The HParams plugin's session: {hparam: value} and the metric tags it shows; None when absent."""
    try:
        content = acc.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    except KeyError:  # EventAccumulator's way of saying the run has no data of that plugin
        return None
    start = HParamsPluginData.FromString(content[hparams_metadata.SESSION_START_INFO_TAG]).session_start_info
    values = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    experiment = HParamsPluginData.FromString(content[hparams_metadata.EXPERIMENT_TAG]).experiment
    return values, {m.name.tag for m in experiment.metric_infos}


def expected_validation(exp: Path) -> dict[str, list[float]]:
    """val_<metric> per validation, as the run recorded it: the fitted start's (before the first step),
    then each epoch's; `val_spearman` is Lightning's own (the record's top level), as MLflow takes it."""
    records = [read_json(exp, "metrics/metrics.json").get("start")] + epochs(exp)
    out: dict[str, list[float]] = {}
    for record in filter(None, records):
        for name in METRICS:
            value = record.get("val_spearman") if name == "spearman" else record["val"][name]
            if value is not None:
                out.setdefault(f"val_{name}", []).append(value)
    return out


@pytest.mark.parametrize("writer", ["tensorboard", "tensorboardX"])
def test_every_val_metric_per_epoch_the_test_metrics_once_and_the_plan_as_hparams(
    tmp_path, blat_db, writer, monkeypatch
):
    if writer == "tensorboardX":  # what the image has: tensorboardX without tensorboard
        import lightning.fabric.loggers.tensorboard as lightning_tensorboard

        monkeypatch.setattr(lightning_tensorboard, "_TENSORBOARD_AVAILABLE", False)
    exp = tmp_path / "experiments" / "tb"
    plan = write(tmp_path / "tb.json", plan_doc(blat_db, "tb", seed=3))
    assert main([str(plan), "--exp-dir", str(exp)]) == 0
    got = read_json(exp, "metrics/metrics.json")
    version = exp / "logs/tensorboard/version_0"
    acc = board(version)
    values = scalars(acc)

    # every validation metric of the plan, at the steps of val_loss (the start's at step 0), once each
    val_steps = [step for step, _ in values["val_loss"]]
    assert val_steps[0] == 0 and len(val_steps) == 1 + len(epochs(exp))  # mlp: a fitted start, then 2 epochs
    for tag, expected in expected_validation(exp).items():
        assert [step for step, _ in values[tag]] == val_steps, tag
        assert [value for _, value in values[tag]] == pytest.approx(expected, rel=1e-6), tag

    # the test metrics once, after the last step; the kept model's validation metrics beside them
    last_step = torch.load(exp / "ckpts/last.ckpt", weights_only=True)["global_step"]
    for name in METRICS:
        assert values[f"test_{name}"] == [(last_step, pytest.approx(got["test"][name], rel=1e-6))], name
        assert values[f"kept/val_{name}"] == [(last_step, pytest.approx(got["val"][name], rel=1e-5))], name

    # the resolved plan as hparams, with those metrics: the HParams tab's row of this run
    params, shown = hparams(acc)
    assert {k: params[k] for k in ("train.seed", "train.batch_size", "data.dataset", "split.strategy")} == {
        "train.seed": 3,
        "train.batch_size": 128,
        "data.dataset": DEMO_SOURCE,
        "split.strategy": "random",
    }
    assert params["model.name"] == "mlp" and params["train.lr"] == pytest.approx(0.001)
    assert params["data.where"] == "[]" and params["train.deterministic"] == "false"  # JSON text
    assert params["metrics"] == json.dumps(METRICS)
    assert "data.limit" in params and "data.sample" not in params  # null: left out
    assert not [k for k in params if k.startswith(("tracking", "resources"))]
    assert shown == {f"test_{m}" for m in METRICS} | {f"kept/val_{m}" for m in METRICS} | {"kept/val_loss"}

    # two files: the epochs', and the end's (its own suffix); the CSV log keeps Lightning's columns
    files = sorted(p.name for p in version.glob("events.out.tfevents.*"))
    assert len(files) == 2 and files[1].endswith(".kept"), files
    # tensorboardX names its files by second and host alone, torch's writer adds the process and a counter
    assert files[0].endswith(socket.gethostname()) == (writer == "tensorboardX"), files
    header = (exp / "logs/csv/version_0/metrics.csv").read_text().splitlines()[0]
    assert header.split(",") == ["epoch", "step", "train_loss", "val_loss", "val_spearman"]


def test_undefined_metrics_are_left_out_never_nan(tmp_path):
    from runner.data.proteingym import import_proteingym

    db = tmp_path / "pg.sqlite"
    import_proteingym(make_proteingym_folder(tmp_path / "pg"), db, [DEMO_SOURCE])
    # position-wise folds: a one-hot ridge predicts a constant at positions it never saw, so Spearman
    # and Pearson are undefined on val and test (tests/test_core_regimes.py)
    doc = {
        "name": "modulo",
        "data": {"db": str(db)},
        "model": {"name": "ridge"},
        "split": {"strategy": "column", "column": "fold_modulo_5", "n_folds": 5, "fold": 0},
        "train": {"max_epochs": 1},
        "metrics": METRICS,
    }
    exp = tmp_path / "modulo"
    assert main([str(write(tmp_path / "modulo.json", doc)), "--exp-dir", str(exp)]) == 0
    got = read_json(exp, "metrics/metrics.json")
    assert got["test"]["spearman"] is None and got["test"]["pearson"] is None  # the premise

    acc = board(exp / "logs/tensorboard/version_0")
    values = scalars(acc)
    for name in ("spearman", "pearson"):
        assert {f"val_{name}", f"test_{name}", f"kept/val_{name}"}.isdisjoint(values), name
    for name in ("mse", "rmse", "mae", "ndcg"):
        assert len(values[f"val_{name}"]) == 1 and len(values[f"test_{name}"]) == 1, name
    _, shown = hparams(acc)
    assert "test_spearman" not in shown and "test_mse" in shown


class StopAfterFirstEpoch(GracefulStop):
    """SIGTERM's graceful stop, requested at the end of the first epoch (an event, not a moment)."""

    def callback(self) -> Callback:
        stop = self

        class _Stop(Callback):
            def on_train_epoch_end(self, trainer, pl_module) -> None:
                stop.requested = True
                trainer.should_stop = True

        return _Stop()


def test_a_resumed_run_has_its_own_version_with_the_rest_and_the_end(tmp_path, blat_db):
    plan = plan_from_document(plan_doc(blat_db, "resumed"), "plan")
    exp = tmp_path / "resumed"
    with pytest.raises(Cancelled):
        run_experiment(plan, exp, stop=StopAfterFirstEpoch())
    run_experiment(plan, exp)
    first, second = (board(exp / f"logs/tensorboard/version_{n}") for n in (0, 1))
    before, after = scalars(first), scalars(second)

    # the stopped attempt: the start and epoch 0, no end; the resumed one: epoch 1, then the end
    assert [step for step, _ in before["val_pearson"]] == [step for step, _ in before["val_loss"]]
    assert len(before["val_pearson"]) == 2 and hparams(first) is None
    assert not [tag for tag in before if tag.startswith(("test_", "kept/"))]
    assert [step for step, _ in after["val_pearson"]] == [step for step, _ in after["val_loss"]]
    assert len(after["val_pearson"]) == 1 and after["val_pearson"][0][0] > before["val_pearson"][-1][0]
    assert [v for _, v in before["val_pearson"] + after["val_pearson"]] == pytest.approx(
        expected_validation(exp)["val_pearson"], rel=1e-6
    )
    got = read_json(exp, "metrics/metrics.json")
    assert [v for _, v in after["test_mae"]] == [pytest.approx(got["test"]["mae"], rel=1e-6)]
    params, _ = hparams(second)
    assert params["name"] == "resumed"


def test_the_points_of_a_seed_sweep_in_one_slot_process_differ_in_train_seed(tmp_path, blat_db):
    # what a study slot does for each point (runner.core.slot): run_point with the slot's shared data
    shared = SharedData()
    exps = {}
    for seed in (0, 1):
        point = write(tmp_path / f"point-{seed}.json", plan_doc(blat_db, "sweep", seed=seed, max_epochs=1))
        exps[seed] = tmp_path / "experiments" / f"sweep-{seed}"
        assert run_point(point, exps[seed], shared=shared, experiment_id=f"sweep-{seed}") == 0
    assert shared.hits["variants"] == 1  # the second point took the first one's data: one process, shared

    for seed, exp in exps.items():
        versions = sorted(p.name for p in (exp / "logs/tensorboard").iterdir())
        assert versions == ["version_0"]  # each point its own files, nothing of the other point's
        version = exp / "logs/tensorboard/version_0"
        assert len(list(version.glob("events.out.tfevents.*"))) == 2
        acc = board(version)
        params, _ = hparams(acc)
        assert params["train.seed"] == seed
        got = read_json(exp, "metrics/metrics.json")
        values = scalars(acc)
        assert [v for _, v in values["test_spearman"]] == [pytest.approx(got["test"]["spearman"], rel=1e-6)]
        assert len(values["val_pearson"]) == len(values["val_loss"])
