"""The workdirs a user ran experiments in (runner/workdir/known.py), which `infra prune --images`
reads so that pruning one workdir keeps the images another one's experiments ran on (issue 23 #6;
the engine test is tests/test_housekeeping.py::test_prune_images_removes_only_unused_infra_images)."""

from __future__ import annotations

import os
from pathlib import Path

from runner.run.launch import preflight_paths
from runner.settings import node_settings
from runner.workdir.known import KNOWN_FILE, known_workdirs, remember
from tests.conftest import make_db


def test_a_run_remembers_its_workdir_once(tmp_path):
    db = make_db(tmp_path / "x.db")
    first, second = tmp_path / "a", tmp_path / "b"
    for wd in (first, second, first):
        wd.mkdir(exist_ok=True)
        preflight_paths(db, wd, node_settings())  # what every run, study and worker job passes through
    assert known_workdirs() == [first.resolve(), second.resolve()]


def test_a_damaged_or_planted_list_reads_as_empty_and_is_rewritten(tmp_path):
    from runner.settings import config_dir

    config_dir().mkdir(parents=True, exist_ok=True)
    path = config_dir() / KNOWN_FILE
    path.write_text('{"not": "a list"}')
    assert known_workdirs() == []
    path.write_text('["relative/path", 5, "/abs/ok"]')
    assert known_workdirs() == [Path("/abs/ok")]
    path.unlink()
    os.mkfifo(path)  # never blocked on
    assert known_workdirs() == []
    remember(tmp_path)
    assert known_workdirs() == [tmp_path.resolve()] and path.is_file()
