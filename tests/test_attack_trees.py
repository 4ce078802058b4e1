"""Trees a container made, attacked (docs/security.md, "The host, reading and writing an experiment").

A training can leave a tree of any shape. These tests build real ones (3000 levels: deeper than
Python's recursion limit, and longer than PATH_MAX as one path) and check that the host's walks
are iterative, never follow a link, stay within their bounds and fail closed: setuid/setgid bits are
cleared before the record says how the attempt ended, a tree that cannot be fully checked makes the
attempt `failed` with one line naming the path and the limit, and `infra rm`/`prune` and predict's
scratch cleanup remove any tree. The docker tests run the attack through a real `infra run` as
root (the quick start), with a hostile plugin (tests/attack_trees_plugin.py).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import pytest

from runner import safefs
from runner.run.records import Experiment, new_record
from tests.helpers import REPO, cli

DEEP = 3000
SETID = stat.S_ISUID | stat.S_ISGID
PLUGIN = Path(__file__).parent / "attack_trees_plugin.py"


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path):
    """Remove what each test made with the iterative remover: pytest cleans old temporary folders with
    shutil.rmtree, which raises RecursionError on these trees (in any later session, anyone's)."""
    yield
    for entry in list(tmp_path.iterdir()):
        safefs.remove_tree(entry)


def deep_tree(top: Path, depth: int = DEEP, name: str = "d") -> None:
    """`top/d/d/…` `depth` levels deep, made one descriptor at a time (the path exceeds PATH_MAX)."""
    top.mkdir(parents=True, exist_ok=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)


def setid_file(path: Path, mode: int = 0o6755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"#!/bin/sh\n")
    os.chmod(path, mode)
    return path


def make_exp(workdir: Path, exp_id: str = "trees-0123456789", state: str = "running", **fields) -> Experiment:
    exp = Experiment(workdir / "experiments" / exp_id)
    exp.make_layout()
    record = new_record(exp, name="trees", backend="local", plan_sha="0" * 64, attempt=1, previous=None)
    exp.write({**record, "state": state, "finished_at": "2020-01-01T00:00:00.000Z", **fields})
    return exp


# --- the walker and the remover on real trees ---------------------------------------------------------


def test_setuid_beside_a_3000_level_tree_is_cleared_and_the_depth_is_reported(tmp_path):
    deep_tree(tmp_path / "config")
    setid_file(tmp_path / "config" / "zz_suid")  # beside the deep tree, listed after it
    setid_file(tmp_path / "config" / "d" / "d" / "nested", 0o2711)
    budget = safefs.WalkBudget()
    checked = safefs.clear_setid_bits(tmp_path / "config", budget)
    assert sorted(checked.cleared) == ["d/d/nested", "zz_suid"]
    assert stat.S_IMODE((tmp_path / "config" / "zz_suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "config" / "d" / "d" / "nested").stat().st_mode) == 0o711
    assert checked.unchecked is not None and "\n" not in checked.unchecked
    assert checked.unchecked.endswith(": more than 256 folder levels deep (limit WALK_MAX_DEPTH)")
    assert checked.unchecked.startswith(str(tmp_path / "config" / "d" / "d"))
    assert len(checked.unchecked) < safefs.SHOWN_PATH_CHARS + 80
    assert budget.seen < 300  # nothing below the depth limit was listed


def test_setuid_at_the_depth_limit_is_cleared(tmp_path):
    deep_tree(tmp_path / "a", safefs.WALK_MAX_DEPTH - 1)
    bottom = tmp_path.joinpath("a", *["d"] * (safefs.WALK_MAX_DEPTH - 1))
    setid_file(bottom / "suid")
    checked = safefs.clear_setid_bits(tmp_path / "a")
    assert checked.unchecked is None
    assert checked.cleared == ["/".join([*["d"] * (safefs.WALK_MAX_DEPTH - 1), "suid"])]
    assert not (bottom / "suid").stat().st_mode & SETID


def test_the_walk_stops_at_its_entry_and_time_limits_and_says_which(tmp_path):
    for i in range(20):
        (tmp_path / "wide" / f"f{i:02}").parent.mkdir(exist_ok=True)
        (tmp_path / "wide" / f"f{i:02}").touch()
    few = safefs.clear_setid_bits(tmp_path / "wide", safefs.WalkBudget(entries=10))
    assert few.unchecked == f"{tmp_path / 'wide'}: more than 10 entries to check (limit WALK_MAX_ENTRIES)"
    # A budget whose time is already spent (negative), so the test never races the clock.
    late = safefs.clear_setid_bits(tmp_path / "wide", safefs.WalkBudget(seconds=-1))
    assert late.unchecked == f"{tmp_path / 'wide'}: not checked within -1 s (limit WALK_MAX_SECONDS)"


def test_the_walk_never_follows_links(tmp_path):
    outside = tmp_path / "outside"
    victim = setid_file(outside / "victim")  # a setuid file the training does not own
    tree = tmp_path / "artifacts"
    tree.mkdir()
    (tree / "to_file").symlink_to(victim)
    (tree / "to_dir").symlink_to(outside)
    (tree / "loop").symlink_to(tree)
    checked = safefs.clear_setid_bits(tree)
    assert checked.cleared == [] and checked.unchecked is None
    assert stat.S_IMODE(victim.stat().st_mode) == 0o6755
    (tmp_path / "link_top").symlink_to(tree)
    with pytest.raises(safefs.Tampered, match="link_top: is a symbolic link"):
        safefs.clear_setid_bits(tmp_path / "link_top")


def test_remove_tree_removes_3000_levels_closed_folders_and_never_follows_links(tmp_path):
    outside = tmp_path / "outside"
    precious = setid_file(outside / "precious")
    victim = tmp_path / "victim"
    deep_tree(victim / "config")
    (victim / "config" / "d" / "escape").symlink_to(outside)
    (victim / "config" / "d" / "file_link").symlink_to(precious)
    closed = victim / "closed"
    (closed / "inner").mkdir(parents=True)
    (closed / "inner" / "f").write_text("x")
    os.chmod(closed / "inner", 0)
    os.chmod(closed, 0o500)  # no write permission: its entries cannot be unlinked until opened up
    assert safefs.tree_bytes(victim) == (1 if os.geteuid() == 0 else 0)  # what it may read, no crash
    safefs.remove_tree(victim)
    assert not victim.exists()
    assert precious.read_bytes() == b"#!/bin/sh\n" and stat.S_IMODE(precious.stat().st_mode) == 0o6755


CLOSED_TREE = """
import os, sys
from pathlib import Path
from runner import safefs
base = Path(sys.argv[1]) / "tree"
(base / "a" / "b").mkdir(parents=True)
(base / "a" / "b" / "suid").write_text("x")
os.chmod(base / "a" / "b" / "suid", 0o4100)  # not even readable
os.chmod(base / "a" / "b", 0o100)  # search only
os.chmod(base / "a", 0)
checked = safefs.clear_setid_bits(base)
print(checked.cleared, checked.unchecked, oct(os.stat(base / "a" / "b" / "suid").st_mode))
os.chmod(base / "a" / "b", 0o500)
os.chmod(base / "a", 0)
safefs.remove_tree(base)
print(base.exists())
"""


def test_folders_a_training_closed_are_opened_checked_and_removed_by_their_owner(run_user, tmp_path):
    """Not as root (no CAP_DAC_OVERRIDE): the invoker owns what its training made and opens it up."""
    import subprocess

    from tests.e2e import chown_to

    top = Path(tempfile.mkdtemp(prefix="infra-closed-", dir="/tmp"))  # pytest's folders are root's only
    try:
        chown_to(run_user, top)
        cmd = [sys.executable, "-c", CLOSED_TREE, str(top)]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", run_user[2], "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.splitlines() == ["['a/b/suid'] None 0o100100", "False"]
    finally:
        safefs.remove_tree(top)


def test_remove_tree_of_a_link_removes_the_link_only(tmp_path):
    target = tmp_path / "target"
    (target / "keep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(target)
    safefs.remove_tree(tmp_path / "link")
    assert not os.path.lexists(tmp_path / "link") and (target / "keep").is_dir()
    safefs.remove_tree(tmp_path / "missing")  # nothing there is fine


def test_tree_bytes_counts_a_3000_level_tree_without_following_links(tmp_path):
    deep_tree(tmp_path / "t")
    bottom_fd = os.open(tmp_path / "t", os.O_RDONLY)
    for _ in range(DEEP):
        child = os.open("d", os.O_RDONLY, dir_fd=bottom_fd)
        os.close(bottom_fd)
        bottom_fd = child
    fd = os.open("data", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=bottom_fd)
    os.write(fd, b"x" * 1234)
    os.close(fd)
    os.close(bottom_fd)
    big = tmp_path / "big"
    big.write_bytes(b"y" * 10_000)
    (tmp_path / "t" / "link").symlink_to(big)
    assert safefs.tree_bytes(tmp_path / "t") == 1234


# --- the attempt fails closed, before its record says `succeeded` ----------------------------------------


def test_an_attempt_with_an_uncheckable_tree_is_failed_and_its_setuid_file_cleared(tmp_path):
    from runner.run.reconcile import finalize

    exp = make_exp(tmp_path)
    deep_tree(exp.root / "config")
    suid = setid_file(exp.root / "artifacts" / "zz_suid")
    record = finalize(exp, exp.read(), 0)
    assert record["state"] == "failed" and record["exit_code"] == 0
    deep = exp.root / "config" / "d"
    assert record["message"].startswith(str(deep))
    limit = ": more than 256 folder levels deep (limit WALK_MAX_DEPTH); the training's output could not be "
    assert limit in record["message"]
    assert record["message"].endswith(f"remove it with 'infra rm {exp.id}'") and "\n" not in record["message"]
    assert not suid.stat().st_mode & SETID  # the other folders were still checked
    assert stat.S_IMODE((exp.root / "config").stat().st_mode) == 0o700  # closed to everyone but its owner
    states = [e.get("state") for e in exp.events() if e["event"] == "state"]
    assert "succeeded" not in states  # never said, not even for a moment
    tampered = [e for e in exp.events() if e["event"] == "tampered"]
    assert {"path": "artifacts/zz_suid", "action": "setuid/setgid bits removed"}.items() <= tampered[0].items()
    assert tampered[1]["action"] == "output not fully checked for setuid/setgid files"


def test_a_clean_attempt_still_succeeds_with_its_bits_cleared(tmp_path):
    from runner.run.reconcile import finalize

    exp = make_exp(tmp_path)
    deep_tree(exp.root / "config", 50)
    suid = setid_file(exp.root / "ckpts" / "a" / "b" / "suid")
    record = finalize(exp, exp.read(), 0)
    assert record["state"] == "succeeded" and record["message"] is None
    assert not suid.stat().st_mode & SETID


@pytest.mark.docker
def test_a_container_that_vanished_is_lost_with_its_outputs_hardened(tmp_path, docker_client):
    """A record whose container is gone from the engine becomes `lost`; the container ran, so what it
    left is hardened as a finished attempt's is."""
    from runner.run.backends import backend_for

    exp = make_exp(tmp_path)
    exp.update(state="running", backend="docker", container_id="0" * 64)
    suid = setid_file(exp.root / "artifacts" / "zz_suid")
    record = backend_for("docker").reconcile(exp, exp.read())
    assert record["state"] == "lost"
    assert record["message"] == "the container is gone from the engine (removed or the engine was reset)"
    assert not suid.stat().st_mode & SETID


def test_a_setuid_file_left_in_the_embedding_cache_is_cleared(tmp_path):
    """plm trainings write the workdir's embedding cache (mounted read-write): a file left there with
    setuid bits is hardened like the experiment's own outputs (review of issue 24)."""
    from runner.run.reconcile import finalize

    exp = make_exp(tmp_path)
    suid = setid_file(tmp_path / "cache" / "embeddings" / "planted")
    record = finalize(exp, exp.read(), 0)
    assert record["state"] == "succeeded"
    assert not suid.stat().st_mode & SETID
    tampered = [e for e in exp.events() if e["event"] == "tampered"]
    assert tampered[0]["path"] == "cache/embeddings/planted"


def test_experiment_folders_are_private_to_their_owner(tmp_path):
    work = tmp_path / "work"
    (work / "experiments").mkdir(parents=True)
    os.chmod(work / "experiments", 0o755)  # made before this release: narrowed on the next layout
    exp = make_exp(work)
    assert stat.S_IMODE((work / "experiments").stat().st_mode) == 0o700
    assert stat.S_IMODE(exp.root.stat().st_mode) == 0o700


# --- infra rm / prune / predict's scratch folder on a 3000-level tree -------------------------------------


def test_infra_rm_and_its_dry_run_work_on_a_3000_level_tree(tmp_path):
    work = tmp_path / "work"
    exp = make_exp(work, state="succeeded")
    deep_tree(exp.root / "config")
    (exp.root / "metrics" / "metrics.json").write_bytes(b"{" + b" " * 998 + b"}")
    dry = cli("rm", exp.id, "--dry-run", "--json", workdir=work)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert json.loads(dry.stdout)["experiments"][0]["bytes"] >= 1000
    assert exp.root.is_dir()
    result = cli("rm", exp.id, workdir=work)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not exp.root.exists()
    assert [p.name for p in (work / "experiments").iterdir()] == [".locks"]  # no `.removing-*` left


def test_infra_prune_works_on_a_workdir_with_a_3000_level_tree(tmp_path):
    work = tmp_path / "work"
    deep = make_exp(work, "deep-0123456789", state="failed")
    deep_tree(deep.root / "artifacts")
    other = make_exp(work, "other-0123456789", state="succeeded")
    dry = cli("prune", "--older-than", "1d", "--dry-run", "--json", workdir=work)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert sorted(e["experiment_id"] for e in json.loads(dry.stdout)["experiments"]) == [deep.id, other.id]
    result = cli("prune", "--older-than", "1d", "--json", workdir=work)
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(e["removed"] for e in json.loads(result.stdout)["experiments"])
    assert not deep.root.exists() and not other.root.exists()


def test_a_predict_scratch_folder_with_a_3000_level_tree_is_removed(tmp_path):
    """What `runner.run.predict` does in its `finally`: the container's folder goes, whatever it holds."""
    scratch = tmp_path / ".infra-predict-abc123"
    deep_tree(scratch)
    setid_file(scratch / "result.csv")
    (scratch / "link").symlink_to(tmp_path)
    safefs.remove_tree(scratch, ignore_errors=True)
    assert list(tmp_path.iterdir()) == []


# --- the attack through a real `infra run`, as root (the quick start) ------------------------------------


def _root_workdir(tmp_path: Path) -> Path:
    from runner.data.importer import build_demo_db

    if os.geteuid() != 0:
        pytest.skip("the attack as the quick start runs it needs root (CI runs as root)")
    work = tmp_path / "work"
    shutil.copytree(REPO / "plugins_template", work)
    shutil.copy(PLUGIN, work / "model" / "treemaker.py")
    build_demo_db(work / "data" / "blat_ecolx.db")
    return work


def _plan(work: Path, exp_id: str, model: str) -> Path:
    doc = {
        "name": "trees",
        "experiment_id": exp_id,
        "data": {"db": "data/blat_ecolx.db", "limit": 300},
        "model": {"name": model},
        "train": {"max_epochs": 1, "batch_size": 64, "early_stopping_patience": 0},
    }
    path = work / "plans" / f"{exp_id}.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.docker
@pytest.mark.slow
def test_a_deep_tree_and_a_setuid_file_from_a_plugin_fail_the_run_closed(base_image, tmp_path):
    from tests.e2e import BASE_ENV

    work = _root_workdir(tmp_path)
    result = cli("run", str(_plan(work, "trees-attack", "treemaker")), "--json", workdir=work, env=BASE_ENV)
    exp_dir = work / "experiments" / "trees-attack"
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    suid = exp_dir / "artifacts" / "zz_suid"
    assert suid.stat().st_uid == 10001  # the training made it (as the node's training uid)…
    assert not suid.stat().st_mode & SETID  # …and the host cleared its bits
    record = json.loads((exp_dir / "status.json").read_text())
    assert record["state"] == "failed" and record["exit_code"] == 0  # the training itself succeeded
    assert record["message"].startswith(str(exp_dir / "config" / "deep"))
    assert "more than 256 folder levels deep (limit WALK_MAX_DEPTH)" in record["message"]
    error = json.loads(result.stdout)["error"]
    assert error["message"].startswith("experiment trees-attack failed (exit code 0): ")
    assert "more than 256 folder levels deep (limit WALK_MAX_DEPTH)" in error["message"]
    assert (exp_dir / "metrics" / "metrics.json").is_file()  # the container reached its folders
    events = [json.loads(line) for line in (exp_dir / "events.jsonl").read_text().splitlines()]
    assert "succeeded" not in [e.get("state") for e in events if e["event"] == "state"]
    assert stat.S_IMODE((work / "experiments").stat().st_mode) == 0o700
    assert stat.S_IMODE(exp_dir.stat().st_mode) == 0o700

    removed = cli("rm", "trees-attack", workdir=work)
    assert removed.returncode == 0, removed.stderr[-2000:]
    assert not exp_dir.exists()


@pytest.mark.docker
@pytest.mark.slow
def test_a_run_as_root_trains_in_private_experiment_folders(base_image, tmp_path):
    """The experiment directory is root's and 0700, yet the training (uid 10001) writes its folders:
    each is bind-mounted on its own, so the container never crosses the private parents."""
    from tests.e2e import BASE_ENV

    work = _root_workdir(tmp_path)
    (work / "model" / "treemaker.py").unlink()
    result = cli("run", str(_plan(work, "trees-plain", "linear")), "--json", workdir=work, env=BASE_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    exp_dir = work / "experiments" / "trees-plain"
    assert json.loads(result.stdout)["state"] == "succeeded"
    assert exp_dir.stat().st_uid == 0 and stat.S_IMODE(exp_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((work / "experiments").stat().st_mode) == 0o700
    assert (exp_dir / "metrics").stat().st_uid == 10001
    assert (exp_dir / "artifacts" / "model.pth").is_file()
