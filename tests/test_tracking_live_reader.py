"""The live MLflow client's reader of `metrics/metrics.jsonl` (`tracking_live.EpochReader`) against a
training that writes what it likes there, and the checks on the files logged at the end. Real files,
links and FIFOs; no server (host tier: nothing here imports torch or mlflow)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from runner.run import tracking
from runner.run.records import Experiment
from runner.run.tracking_live import MAX_LINE, EpochReader

LINE = b'{"epoch":0,"a":0}\n'


def experiment(tmp_path: Path) -> Experiment:
    exp = Experiment(tmp_path / "experiments" / "x-1")
    exp.make_layout()
    return exp


def jsonl(exp: Experiment) -> Path:
    return exp.root / "metrics" / "metrics.jsonl"


def epoch(n: int, **values) -> bytes:
    return (json.dumps({"epoch": n, **values}) + "\n").encode()


def read_in_thread(reader: EpochReader) -> list:
    """`reader.new()` in a thread, joined with a guard: a reader that blocks (a FIFO) fails the test
    instead of hanging it."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(reader.new()), daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the reader blocked"
    return out[0]


def test_a_line_without_its_newline_is_held_until_complete(tmp_path):
    exp = experiment(tmp_path)
    reader = EpochReader(exp.root)
    assert reader.new() == []  # no file yet: nothing, and not a reason to stop
    jsonl(exp).write_bytes(epoch(0, train_loss=1.5) + b'{"epoch": 1, "train_lo')
    assert reader.new() == [(0, "train_loss", 1.5)]
    assert reader.new() == []  # the half line stays held
    with jsonl(exp).open("ab") as fh:
        fh.write(b'ss": 0.5}\n')
    assert reader.new() == [(1, "train_loss", 0.5)]
    assert reader.offset == jsonl(exp).stat().st_size and reader.stopped is None  # each byte read once


def test_a_line_over_max_line_is_skipped_not_buffered(tmp_path):
    exp = experiment(tmp_path)
    reader = EpochReader(exp.root)
    long = b'{"epoch": 0, "pad": "' + b"x" * (MAX_LINE + 10)
    jsonl(exp).write_bytes(long)
    assert reader.new() == [] and reader.partial == b"" and reader.skipping  # dropped, not kept in memory
    with jsonl(exp).open("ab") as fh:
        fh.write(b'", "train_loss": 9}\n' + epoch(1, train_loss=0.25))
    assert reader.new() == [(1, "train_loss", 0.25)]  # the long line's end skipped too, the next one read
    whole = experiment(tmp_path / "b")
    jsonl(whole).write_bytes(b'{"epoch": 0, "pad": "' + b"x" * (MAX_LINE + 10) + b'"}\n' + epoch(1, v=2))
    assert EpochReader(whole.root).new() == [(1, "v", 2.0)]


def test_a_file_rewritten_from_the_start_stops_live_reading(tmp_path):
    """The attack: 16 MiB of `{"epoch":0,"a":0}` lines, truncated and written again (every poll): the old
    reader started over each time and sent ~900k values per poll. Each epoch is sent once, and a file
    that shrank stops the live reader (the end logs it post-hoc, capped)."""
    exp = experiment(tmp_path)
    flood = LINE * (tracking.METRICS_LINES_LIMIT // len(LINE))
    jsonl(exp).write_bytes(flood)
    reader = EpochReader(exp.root)
    assert reader.new() == [(0, "a", 0.0)]  # one epoch, once
    truncate_and_write(jsonl(exp), flood)  # between two polls: the same size, nothing new to read
    assert reader.new() == [] and reader.offset == len(flood)
    truncate_and_write(jsonl(exp), b"")  # a poll sees it shorter: stopped, for good
    assert reader.new() == [] and "shrank" in reader.stopped
    truncate_and_write(jsonl(exp), flood + epoch(1, a=1))
    assert reader.new() == [] and reader.offset == len(flood)


def truncate_and_write(path: Path, data: bytes) -> None:
    with path.open("r+b") as fh:  # in place: the same inode, as a plugin holding it open would
        fh.truncate(0)
        fh.write(data)


def test_a_replaced_file_stops_live_reading_a_removed_one_is_waited_for(tmp_path):
    exp = experiment(tmp_path)
    jsonl(exp).write_bytes(epoch(0, a=1))
    reader = EpochReader(exp.root)
    assert reader.new() == [(0, "a", 1.0)]
    fresh = jsonl(exp).with_name("new.jsonl")
    fresh.write_bytes(epoch(0, a=1) + epoch(1, a=2) + epoch(2, a=3))  # longer: only the inode tells
    os.replace(fresh, jsonl(exp))
    assert reader.new() == [] and "replaced" in reader.stopped
    removed = experiment(tmp_path / "b")
    jsonl(removed).write_bytes(epoch(0, a=1))
    gone = EpochReader(removed.root)
    gone.new()
    other = jsonl(removed).with_name("other.jsonl")
    other.write_bytes(epoch(0, a=1) + epoch(1, a=2))  # made while the first exists: another inode
    jsonl(removed).unlink()  # a docker study slot moves the folders back when its point ends
    assert gone.new() == [] and gone.stopped is None
    os.replace(other, jsonl(removed))  # another file where it was
    assert gone.new() == [] and "replaced" in gone.stopped


def test_a_link_in_place_of_metrics_is_not_followed(tmp_path):
    exp = experiment(tmp_path)
    secret = tmp_path / "host.jsonl"
    secret.write_bytes(epoch(0, secret_value=42))
    jsonl(exp).symlink_to(secret)
    reader = EpochReader(exp.root)
    assert read_in_thread(reader) == [] and reader.stopped is not None
    assert reader.offset == 0


def test_a_fifo_in_place_of_metrics_never_blocks_the_reader(tmp_path):
    exp = experiment(tmp_path)
    os.mkfifo(jsonl(exp))  # no writer: a blocking open would wait forever
    reader = EpochReader(exp.root)
    assert read_in_thread(reader) == [] and "FIFO" in reader.stopped.upper()


def test_the_reader_reads_at_most_the_byte_cap_over_its_life(tmp_path):
    """16 MiB of lines the checks drop, then a real epoch: never read, however often the reader looks."""
    exp = experiment(tmp_path)
    pad = b'{"epoch": 0, "pad": "' + b"x" * 1000 + b'"}\n'
    jsonl(exp).write_bytes(pad * (tracking.METRICS_LINES_LIMIT // len(pad) + 1) + epoch(1, a=1))
    reader = EpochReader(exp.root)
    assert reader.new() == []
    assert reader.offset == tracking.METRICS_LINES_LIMIT and "bytes read live" in reader.stopped
    with jsonl(exp).open("ab") as fh:
        fh.write(epoch(2, a=1))
    assert reader.new() == [] and reader.offset == tracking.METRICS_LINES_LIMIT


def test_an_epoch_is_sent_once_and_names_and_values_are_capped(tmp_path, monkeypatch):
    exp = experiment(tmp_path)
    wide = {f"m{i}": i for i in range(2000)}  # under MAX_LINE
    jsonl(exp).write_bytes(epoch(0, **wide) + epoch(0, a=1) + epoch(1, a=2))
    reader = EpochReader(exp.root)
    values = reader.new()
    assert len([v for v in values if v[0] == 0]) == tracking.MAX_NAMES_PER_EPOCH  # the first names of epoch 0
    assert (1, "a", 2.0) in values and (0, "a", 1.0) not in values  # epoch 0's repeat is not sent again
    monkeypatch.setattr(tracking, "MAX_METRIC_VALUES", 3)
    capped = experiment(tmp_path / "b")
    jsonl(capped).write_bytes(b"".join(epoch(n, a=1, b=2) for n in range(10)))
    few = EpochReader(capped.root)
    assert len(few.new()) == 3 and "values" in few.stopped


def test_a_checkpoint_that_is_neither_zip_nor_pickle_is_not_copied_as_the_model(tmp_path):
    """ckpts/best.ckpt is the training's file: 100 MB of anything is not copied as the model's checkpoint."""
    exp = experiment(tmp_path)
    (exp.root / "config" / "predict.json").write_text("{}")
    (exp.root / "ckpts" / "best.ckpt").write_bytes(b"\0" * 4096)
    plan = {"model": {"name": "linear"}, "embeddings": {"name": "onehot"}}
    model, why = tracking.model_source(exp, {"state": "succeeded"}, plan, tmp_path / "out")
    assert model is None and "not a checkpoint" in why
    assert not (tmp_path / "out" / "ckpts" / "best.ckpt").exists()
    (exp.root / "ckpts" / "best.ckpt").write_bytes(b"PK\x03\x04" + b"\0" * 100)  # torch.save's zip
    model, why = tracking.model_source(exp, {"state": "succeeded"}, plan, tmp_path / "out2")
    assert model is not None, why
    assert (tmp_path / "out2" / "ckpts" / "best.ckpt").read_bytes().startswith(b"PK")


def test_finalising_never_hashes_the_database(tmp_path):
    """The db's hash is the record's, written when the attempt started (`launch.open_attempt`): whoever
    finalises (an `infra status` included) never reads a database of gigabytes."""
    db = tmp_path / "blat.db"
    db.write_bytes(b"a database")
    plan = {"name": "p", "data": {"db": "/data/blat.db"}}
    params = tracking.run_params(plan, {"db": str(db)})
    assert params["data.db"] == str(db) and "data.db_sha256" not in params
    assert tracking.run_params(plan, {"db": str(db), "db_sha256": "ab" * 32})["data.db_sha256"] == "ab" * 32
