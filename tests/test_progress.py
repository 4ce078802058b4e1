"""The progress view's text and its reading of the core's events (pure logic, no engine, no training).

The view under a real terminal and a real training is tested end to end in test_progress_docker.py.
"""

from __future__ import annotations

import logging
import os

import pytest

from runner.cli import progress
from runner.cli.progress import CoreEvents, Epoch, RunView, epoch_text
from runner.run.launch import BuildLog


def test_epoch_text_is_one_compact_line():
    epoch = Epoch(2, train_loss=0.41234, val_loss=0.455, val_spearman=0.70149)
    assert epoch_text(epoch, 20) == "epoch 3/20  train_loss 0.4123  val_loss 0.4550  val_spearman 0.7015"
    assert epoch_text(epoch, None, best=True).endswith("val_spearman 0.7015  best")
    assert epoch_text(Epoch(0, train_loss=1.0), 3) == "epoch 1/3  train_loss 1.0000"


@pytest.mark.parametrize(
    "doc, expected",
    [
        ({"epoch": 1, "train_loss": 0.5, "val_loss": None, "val_spearman": float("nan")}, Epoch(1, 0.5)),
        ({"epoch": True, "train_loss": 0.5}, None),
        ({"epoch": "1"}, None),
        ({"epoch": -1}, None),
        ({"epoch": 0, "train_loss": "0.5", "val_loss": True, "val_spearman": 1e400}, Epoch(0)),
    ],
)
def test_epoch_events_are_validated(doc, expected):
    assert Epoch.from_event(doc) == expected


def test_best_follows_the_checkpoint_rule():
    spearman = progress.best_rank(Epoch(0, 1.0, 2.0, 0.7))
    assert spearman < progress.best_rank(Epoch(1, 1.0, 2.0, 0.6))
    assert spearman < progress.best_rank(Epoch(1, 0.1, 0.1, None))  # val_spearman ranks first
    assert progress.best_rank(Epoch(0)) is None


def write_events(root, *lines: bytes):
    (root / "logs").mkdir(exist_ok=True)
    with open(root / "logs" / "events.jsonl", "ab") as fh:
        for line in lines:
            fh.write(line)


def test_core_events_are_read_incrementally_and_defensively(tmp_path):
    write_events(tmp_path, b'{"event": "epoch", "epoch": 0}\n')
    events = CoreEvents(tmp_path, from_start=False)  # a new attempt: what is there already is not its own
    assert events.read() == []
    write_events(
        tmp_path,
        b"not json\n",
        b"[1, 2]\n",
        b'{"no_event": 1}\n',
        b'{"event": "x", "pad": "' + b"a" * progress.LINE_CAP + b'"}\n',
        b'{"event": "epoch", "epoch": 1}\n{"event": "epo',
    )
    assert events.read() == [{"event": "epoch", "epoch": 1}]
    write_events(tmp_path, b'ch", "epoch": 2}\n')  # the rest of a line the core was still writing
    assert events.read() == [{"event": "epoch", "epoch": 2}]
    assert [d["epoch"] for d in CoreEvents(tmp_path, from_start=True).read()] == [0, 1, 2]


def test_core_events_refuse_a_planted_link(tmp_path):
    (tmp_path / "logs").mkdir()
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"event": "epoch", "epoch": 7}\n')
    os.symlink(secret, tmp_path / "logs" / "events.jsonl")
    assert CoreEvents(tmp_path, from_start=True).read() == []


def test_core_events_start_over_when_the_file_is_replaced(tmp_path):
    write_events(tmp_path, b'{"event": "epoch", "epoch": 0}\n{"event": "epoch", "epoch": 1}\n')
    events = CoreEvents(tmp_path, from_start=True)
    assert len(events.read()) == 2
    (tmp_path / "logs" / "events.jsonl").write_bytes(b'{"event": "epoch", "epoch": 0}\n')
    assert events.read() == [{"event": "epoch", "epoch": 0}]


def plain_run(tmp_path, capsys, mode="plain"):
    """Feed a plain view what the run path reports for one experiment; return what it printed."""
    exp = tmp_path / "experiments" / "demo-1"
    exp.mkdir(parents=True)
    view = RunView(mode, tmp_path)
    view.validated("demo", "plans/demo.json")
    view.phase({"phase": "image", "tag": "infra-plugins:abc", "reused": False})
    view.build_line("infra: building the plugins image infra-plugins:abc")
    view.build_line("Step 1/2 : FROM infra-base:x")
    view.build_line("infra: built infra-plugins:abc in 3.2 s")
    view.event({"event": "state", "experiment_id": "demo-1", "state": "created", "attempt": 1})
    view.event({"event": "state", "experiment_id": "demo-1", "state": "running", "attempt": 1})
    write_events(
        exp,
        b'{"event": "progress", "phase": "data", "n_selected": 10, "split": {"train": 6, "val": 2, "test": 2}}\n',
        b'{"event": "progress", "phase": "train", "max_epochs": 2}\n',
        b'{"event": "epoch", "epoch": 0, "train_loss": 1.5, "val_loss": 1.25, "val_spearman": 0.5}\n',
    )
    view.training_line("2026 INFO runner.core.experiment: epoch 1/2  train_loss 1.5000")
    view.training_line("/x.py:3: UserWarning: something that matters")
    write_events(exp, b'{"event": "epoch", "epoch": 1, "train_loss": 1.0, "val_loss": 1.5, "val_spearman": 0.4}\n')
    view.event({"event": "state", "experiment_id": "demo-1", "state": "succeeded"})
    view.finish({"test": {"spearman": 0.61, "mse": 0.2, "bad": "x"}, "val": {"spearman": 0.5}})
    return capsys.readouterr().err.splitlines()


def test_plain_view_prints_one_line_per_phase_and_epoch(tmp_path, capsys):
    assert plain_run(tmp_path, capsys) == [
        "validate: plan 'demo' ok (plans/demo.json)",
        "image: infra-plugins:abc is built when the experiment starts",
        "build: the plugins image infra-plugins:abc (log: build.log)",
        "build: infra-plugins:abc built in 3 s",
        "experiment demo-1: created (attempt 1)",
        "experiment demo-1: running",
        "data: 10 variants (train 6, val 2, test 2)",
        "train: up to 2 epochs",
        "epoch 1/2  train_loss 1.5000  val_loss 1.2500  val_spearman 0.5000  best",
        "/x.py:3: UserWarning: something that matters",
        "epoch 2/2  train_loss 1.0000  val_loss 1.5000  val_spearman 0.4000",
        "experiment demo-1: succeeded",
        "val: spearman 0.5000",
        "test: spearman 0.6100  mse 0.2000",
    ]


def test_best_marker_follows_the_cores_word_when_it_gives_one(tmp_path, capsys):
    # with a fitted start, an epoch above every earlier one on val_spearman may still not be kept
    # (not clearly above the start): the core says which epochs became best.ckpt
    exp = tmp_path / "experiments" / "demo-1"
    exp.mkdir(parents=True)
    view = RunView("plain", tmp_path)
    view.event({"event": "state", "experiment_id": "demo-1", "state": "running", "attempt": 1})
    write_events(
        exp,
        b'{"event": "progress", "phase": "train", "max_epochs": 3}\n',
        b'{"event": "epoch", "epoch": 0, "val_spearman": 0.7706, "best": false}\n',
        b'{"event": "epoch", "epoch": 1, "val_spearman": 0.7707, "best": false}\n',
        b'{"event": "epoch", "epoch": 2, "val_spearman": 0.7600, "best": true}\n',
        b'{"event": "epoch", "epoch": 3, "val_spearman": 0.7800, "best": "yes"}\n',  # not a bool: not the core's word
    )
    view.event({"event": "state", "experiment_id": "demo-1", "state": "succeeded"})
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
    assert [line.endswith("  best") for line in lines] == [False, False, True, True], lines


def test_verbose_view_adds_the_raw_lines_and_leaves_epochs_to_the_core(tmp_path, capsys):
    lines = plain_run(tmp_path, capsys, mode="verbose")
    assert "Step 1/2 : FROM infra-base:x" in lines
    assert "2026 INFO runner.core.experiment: epoch 1/2  train_loss 1.5000" in lines
    assert not any(line.startswith("epoch ") for line in lines)


def test_build_lines_are_shown_terminal_safe(tmp_path, capsys):
    view = RunView("verbose", tmp_path)
    view.build_line("Step 2/5 : RUN pip install x")
    view.build_line("Collecting x\x1b]52;c;cm0gLXJmIH4=\x07\x1b[2J done")
    assert capsys.readouterr().err.splitlines() == ["Step 2/5 : RUN pip install x", "Collecting x done"]


def test_quiet_view_prints_nothing(tmp_path, capsys):
    assert plain_run(tmp_path, capsys, mode="quiet") == []


def test_view_mode_follows_the_flags_and_the_stream(monkeypatch):
    class Tty:
        def isatty(self):
            return True

    monkeypatch.delenv("TERM", raising=False)
    assert progress.view_mode(quiet=False, verbose=False, machine=False, stream=Tty()) == "live"
    assert progress.view_mode(quiet=False, verbose=False, machine=True, stream=Tty()) == "quiet"
    assert progress.view_mode(quiet=True, verbose=True, machine=False, stream=Tty()) == "quiet"
    assert progress.view_mode(quiet=False, verbose=True, machine=False, stream=Tty()) == "verbose"
    monkeypatch.setenv("TERM", "dumb")
    assert progress.view_mode(quiet=False, verbose=False, machine=False, stream=Tty()) == "plain"


def test_build_log_keeps_head_and_tail_within_its_cap():
    seen = []
    log = BuildLog(seen.append, limit=100)
    for i in range(100):
        log.add(f"line {i:03d}")
    text = log.text()
    assert len(seen) == 100
    assert text.startswith("line 000\nline 001\n")
    assert text.endswith("line 099\n")
    assert "bytes of build output dropped here]" in text
    assert len(text.encode()) < 100 + 80


def test_the_core_drops_lightning_adverts_but_keeps_its_notices_and_warnings():
    from runner.core.cli import _NoAdverts

    def record(level, message):
        return logging.LogRecord("lightning.pytorch.utilities.rank_zero", level, "x", 1, message, None, None)

    keep = _NoAdverts()
    assert not keep.filter(record(logging.INFO, "💡 Tip: For seamless cloud logging … [litlogger](https://…)"))
    assert not keep.filter(record(logging.INFO, "💡 Tip: … try installing [litmodels](https://…)"))
    assert keep.filter(record(logging.INFO, "GPU available: False, used: False"))
    assert keep.filter(record(logging.WARNING, "litlogger failed to start"))


def test_summary_table_renders_val_and_test(tmp_path):
    from rich.console import Console

    console = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    doc = {"experiment_id": "demo-1", "state": "succeeded", "test": {"spearman": 0.61}, "val": {"spearman": 0.5}}
    console.print(progress.summary_table(doc))
    text = console.export_text()
    assert "demo-1 succeeded" in text
    assert "spearman" in text and "0.5000" in text and "0.6100" in text
    assert progress.summary_footer({**doc, "n": {"train": 6}, "exp_dir": "/x"}) == "train 6; /x"


def test_the_embedding_stage_shows_its_progress_and_its_cache(tmp_path, capsys):
    """The plm embedding computes once per data set (issue 24: "with progress in the run view"): the
    view shows the core's progress lines as its status and one line when the stage ends or is read
    from the cache; the 10 % steps in between are not printed in the plain view."""
    view = RunView("plain", tmp_path)
    for done in (500, 1000):
        view.training_line(f"2026 INFO runner.core.plm: embedding: {done}/1000 sequences (320/s)")
    view.training_line("2026 INFO runner.core.plm: plm: 1000 sequences' features read from the embedding cache (ab12)")
    assert capsys.readouterr().err.splitlines() == [
        "embedding: 1000 sequences computed (kept in the embedding cache)",
        "embedding: 1000 sequences read from the embedding cache",
    ]
