"""The workdirs a user ran experiments in (runner/workdir/known.py), which `infra prune --images`
reads so that pruning one workdir keeps the images another one's experiments ran on (issue 23 #6;
the engine test is tests/test_housekeeping.py::test_prune_images_removes_only_unused_infra_images)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("content", ['{"not": "a list"}', '["relative/path"]', "not json", None])
def test_a_damaged_list_stops_image_pruning_and_is_not_rewritten(tmp_path, content, caplog):
    """Fail closed (review of issue 23): a list that cannot be read would protect fewer images than it
    should, so pruning refuses; a run does not rewrite it (that would forget the other workdirs)."""
    from runner.run.housekeeping import other_workdirs
    from runner.settings import config_dir
    from runner.workdir.known import KnownListDamaged

    config_dir().mkdir(parents=True, exist_ok=True)
    path = config_dir() / KNOWN_FILE
    if content is None:
        os.mkfifo(path)  # never blocked on
    else:
        path.write_text(content)
    with pytest.raises(KnownListDamaged) as info:
        other_workdirs(tmp_path)
    assert info.value.exit_code == 1 and str(path) in info.value.message and "damaged" in info.value.message
    remember(tmp_path)
    assert "could not add" in caplog.text
    assert (path.read_text() == content) if content is not None else stat.S_ISFIFO(path.lstat().st_mode)


def test_a_list_infra_wrote_reads_back(tmp_path):
    from runner.settings import config_dir

    config_dir().mkdir(parents=True, exist_ok=True)
    (config_dir() / KNOWN_FILE).write_text('["/abs/ok"]')
    assert known_workdirs() == [Path("/abs/ok")]
