"""`infra rm` and `infra prune`: experiment directories (hand-made records, planted links, a real
training held at a gate) and real throw-away images in the Docker engine."""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from runner.run.housekeeping import plan_image_prune, prune_images
from runner.run.records import Experiment, new_record
from runner.workdir.known import remember
from tests.helpers import REPO, cli, infra
from tests.test_queue import gated_plan

OLD = (datetime.now(UTC) - timedelta(days=40)).isoformat().replace("+00:00", "Z")
RECENT = (datetime.now(UTC) - timedelta(days=1)).isoformat().replace("+00:00", "Z")


def make_exp(workdir: Path, exp_id: str, state: str, finished_at: str | None = OLD, **fields) -> Experiment:
    """A hand-made experiment: the real layout and record writers, a file of 1000 bytes, its locks."""
    exp = Experiment(workdir / "experiments" / exp_id)
    exp.make_layout()
    record = new_record(exp, name="x", backend="local", plan_sha="0" * 64, attempt=1, previous=None)
    exp.write({**record, "state": state, "finished_at": finished_at, "created_at": finished_at or OLD, **fields})
    (exp.root / "metrics" / "metrics.json").write_bytes(b"{" + b" " * 998 + b"}")
    exp.lock_path.parent.mkdir(exist_ok=True)
    exp.lock_path.touch()
    return exp


@pytest.fixture
def wd(tmp_path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    return work


def test_rm_removes_directories_and_locks(wd):
    a, b, keep = make_exp(wd, "a-1", "succeeded"), make_exp(wd, "b-2", "failed"), make_exp(wd, "c-3", "succeeded")
    dry = cli("rm", "a-1", "b-2", "--dry-run", "--json", workdir=wd)
    assert dry.returncode == 0, dry.stderr
    doc = json.loads(dry.stdout)
    assert doc["dry_run"] is True
    assert [(e["experiment_id"], e["state"], e["removed"]) for e in doc["experiments"]] == [
        ("a-1", "succeeded", False),
        ("b-2", "failed", False),
    ]
    assert all(e["bytes"] >= 1000 for e in doc["experiments"])
    assert a.root.is_dir() and b.root.is_dir()
    result = cli("rm", "a-1", "b-2", workdir=wd)
    assert result.returncode == 0, result.stderr
    assert "removed a-1 (succeeded, " in result.stderr
    assert not a.root.exists() and not b.root.exists() and not a.lock_path.exists()
    assert keep.root.is_dir() and keep.lock_path.exists()
    assert sorted(p.name for p in (wd / "experiments").iterdir()) == [".locks", "c-3"]
    assert cli("ls", workdir=wd).stdout.splitlines()[1].split()[0] == "c-3"


def test_rm_unknown_id_exits_4_and_removes_nothing(wd):
    exp = make_exp(wd, "a-1", "succeeded")
    result = cli("rm", "a-1", "nope-0000000000", workdir=wd)
    assert result.returncode == 4
    assert "no experiment 'nope-0000000000'" in result.stderr
    assert exp.root.is_dir()
    assert cli("rm", "../work", workdir=wd).returncode == 4
    exp.status_path.write_text("{damaged")  # an unreadable record can still be removed
    removed = cli("rm", "a-1", "--json", workdir=wd)
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout)["experiments"][0]["state"] == "unreadable" and not exp.root.exists()


def test_rm_never_follows_links(wd, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    exp = make_exp(wd, "a-1", "succeeded")
    os.symlink(outside, exp.root / "artifacts" / "escape")  # a link the training planted
    (exp.root / "metrics" / "precious").symlink_to(outside / "precious.txt")
    assert cli("rm", "a-1", workdir=wd).returncode == 0
    assert not exp.root.exists() and (outside / "precious.txt").read_text() == "keep me"

    # the experiment entry itself replaced by a link to a directory that looks like an experiment
    fake = tmp_path / "elsewhere"
    shutil.copytree(make_exp(tmp_path / "other", "b-2", "succeeded").root, fake)
    (wd / "experiments" / "b-2").symlink_to(fake)
    make_exp(wd, "c-3", "succeeded")
    result = cli("rm", "c-3", "b-2", workdir=wd)
    assert result.returncode == 2
    assert f"{wd / 'experiments' / 'b-2'} is not a directory (a link or a file)" in result.stderr
    assert (fake / "status.json").exists() and (wd / "experiments" / "b-2").is_symlink()
    assert (wd / "experiments" / "c-3").is_dir()  # checked before anything was deleted


@pytest.mark.core  # trains with the local backend
def test_rm_refuses_a_running_experiment_unless_forced(tmp_path):
    from runner.data.importer import build_demo_db

    work = tmp_path / "work"
    shutil.copytree(REPO / "plugins_template", work)
    shutil.copy(REPO / "tests" / "gate_model.py", work / "model" / "gate.py")
    build_demo_db(work / "data" / "blat.db")
    plan = gated_plan(work, "held")
    started = infra("run", str(plan), "--backend", "local", "--detach", "--json", workdir=work)
    assert started.returncode == 0, started.stderr
    exp_id = json.loads(started.stdout)["experiment_id"]
    exp_dir = work / "experiments" / exp_id
    from tests.e2e import wait_for

    wait_for(lambda: (exp_dir / "metrics" / ".gate-waiting").exists(), 300, "the training to wait at its gate")
    refused = cli("rm", exp_id, workdir=work)
    assert refused.returncode == 2
    assert f"experiment {exp_id} is running; stop it with 'infra stop' first, or use 'infra rm --force'" in (
        refused.stderr
    )
    assert exp_dir.is_dir()
    pid = json.loads((exp_dir / "status.json").read_text())["pid"]
    forced = cli("rm", exp_id, "--force", "--json", workdir=work)
    assert forced.returncode == 0, forced.stderr
    (doc,) = json.loads(forced.stdout)["experiments"]
    assert (doc["stopped"], doc["removed"], doc["state"]) == (True, True, "cancelled")
    assert not exp_dir.exists()
    from runner.run.reconcile import pid_alive

    wait_for(lambda: not pid_alive(pid), 60, "the stopped training's wrapper to exit")  # it exits after its code file


def test_prune_finished_experiments_before_the_cutoff(wd):
    make_exp(wd, "old-ok", "succeeded")
    make_exp(wd, "old-failed", "failed")
    make_exp(wd, "old-lost", "lost")
    make_exp(wd, "new-ok", "succeeded", finished_at=RECENT)
    make_exp(wd, "old-running", "running", finished_at=None, pid=os.getpid(), started_at=OLD)
    broken = make_exp(wd, "old-broken", "failed")
    broken.status_path.write_text("{damaged")
    dry = cli("prune", "--dry-run", "--json", workdir=wd)
    assert dry.returncode == 0, dry.stderr
    doc = json.loads(dry.stdout)
    assert sorted(e["experiment_id"] for e in doc["experiments"]) == ["old-failed", "old-lost", "old-ok"]
    assert doc["bytes"] >= 3000 and doc["images"] == [] and doc["dry_run"] is True
    assert "3 experiment(s) to free" in dry.stderr
    assert (wd / "experiments" / "old-ok").is_dir()
    only_failed = json.loads(cli("prune", "--state", "failed", "--json", workdir=wd).stdout)
    assert [e["experiment_id"] for e in only_failed["experiments"]] == ["old-failed"]
    assert not (wd / "experiments" / "old-failed").exists()
    kept_new = cli("prune", "--older-than", "7d", workdir=wd)
    assert kept_new.returncode == 0
    left = sorted(p.name for p in (wd / "experiments").iterdir())
    assert left == [".locks", "new-ok", "old-broken", "old-running"]
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert cli("prune", "--before", tomorrow, workdir=wd).returncode == 0
    assert sorted(p.name for p in (wd / "experiments").iterdir()) == [".locks", "old-broken", "old-running"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--older-than", "7d", "--before", "2026-01-01"], "--older-than and --before name the same cutoff"),
        (["--before", "7d"], "--before '7d': give a time like 2026-11-01 (for an age use --older-than 7d)"),
        (["--older-than", "2026-01-01"], "--older-than '2026-01-01': give an age like 30m, 12h or 7d"),
        (["--before", "yesterday"], "--before 'yesterday': use an ISO date or time, like 2026-11-01"),
        (["--older-than", "99999999999d"], "--older-than '99999999999d': give an age like 30m"),
        (["--older-than", "999999999d"], "--older-than 999999999d: reaches back before year 1"),
        (["--state", "running"], "--state 'running': prune removes finished experiments only"),
    ],
)
def test_prune_usage_errors(wd, args, message):
    make_exp(wd, "old-ok", "succeeded")
    result = cli("prune", *args, workdir=wd)
    assert result.returncode == 2 and message in result.stderr
    assert (wd / "experiments" / "old-ok").is_dir()


# --- images ---------------------------------------------------------------------------------------------


def test_plan_image_prune_rules():
    now = datetime.now(UTC)
    old, new = int((now - timedelta(days=60)).timestamp()), int(now.timestamp())

    def image(i, tags=("t",), created=old, **labels):
        return {"id": i, "tags": list(tags), "labels": labels, "created": created, "size": 10}

    images = [
        image("dangling", tags=()),
        image("old"),
        image("new", created=new),
        image("used-by-container"),
        image("used-by-experiment"),
        image("base-of-kept"),
        image("child", created=new, **{"infra.base_image": "base-of-kept"}),
    ]
    chosen = plan_image_prune(images, {"used-by-container"}, {"used-by-experiment"}, now - timedelta(days=30))
    assert [(i["id"], i["reason"]) for i in chosen] == [
        ("dangling", "dangling"),
        ("old", "unused, built before the cutoff"),
    ]


@pytest.mark.docker
def test_prune_images_removes_only_unused_infra_images(docker_client, wd, tmp_path):
    token = secrets.token_hex(6)
    label = f"infra.test-prune={token}"
    repo = f"infra-test-prune-{token}"

    def build(tag: str, n: int, **labels) -> str:
        extra = " ".join(f"{k}={v}" for k, v in labels.items())
        dockerfile = f"FROM scratch\nLABEL infra.kind=test infra.test-prune={token} n={n} {extra}\n"
        image, _ = docker_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=f"{repo}:{tag}", rm=True)
        return image.id

    made = []
    try:
        dangling = build("a", 1)
        made.append(dangling)
        made.append(build("a", 2))  # takes the tag: the first image is dangling now
        in_container = build("ctr", 3)
        made.append(in_container)
        container = docker_client.containers.create(
            f"{repo}:ctr", command=["nothing"], labels={"infra.test-prune": token}
        )
        ran = build("ran", 4)
        made.append(ran)
        base = build("base", 5)
        made.append(base)
        made.append(build("child", 6, **{"infra.base_image": base}))
        make_exp(wd, "keeps-ran", "succeeded", finished_at=RECENT, image_id=ran)
        make_exp(wd, "old-used-child", "succeeded", image_id=made[-1])
        child = made[-1]
        # Another workdir of this user ran on an image of its own (issue 23 #6): its run remembered it.
        elsewhere = build("elsewhere", 7)
        made.append(elsewhere)
        other = tmp_path / "other-workdir"
        make_exp(other, "ran-elsewhere", "succeeded", image_id=elsewhere)
        remember(other)

        cutoff = datetime.now(UTC) + timedelta(minutes=5)  # every test image counts as old
        dry = prune_images(docker_client, wd, cutoff, dry_run=True, label=label)
        planned = {i["id"]: i for i in dry.images}
        assert set(planned) == {dangling, made[1]}  # the child is kept by an experiment, so is its base
        assert not any(i["removed"] for i in dry.images)
        everything = prune_images(docker_client, wd, cutoff, dry_run=True, leaving={"old-used-child"}, label=label)
        assert {i["id"] for i in everything.images} == {dangling, made[1], child, base}

        done = prune_images(docker_client, wd, cutoff, label=label)
        assert all(i["removed"] for i in done.images) and len(done.images) == 2
        left = {i.id for i in docker_client.images.list(filters={"label": label})}
        assert left == {in_container, ran, base, child, elsewhere}
        container.remove(force=True)
    finally:  # whatever the test made, nothing else
        for c in docker_client.containers.list(all=True, filters={"label": f"infra.test-prune={token}"}):
            c.remove(force=True)
        for image_id in docker_client.api.images(filters={"label": label}, quiet=True):
            docker_client.api.remove_image(image_id, force=True)


@pytest.mark.docker
def test_prune_images_dry_run_through_the_cli(docker_client, wd):
    """The command on the shared engine, dry run only: a dangling infra image this test made is
    listed with its size and still there afterwards (other images on the engine are not this test's)."""
    token = secrets.token_hex(6)
    label = f"infra.test-prune={token}"
    try:
        for n in (1, 2):  # the same tag twice: the first image is left dangling
            dockerfile = f"FROM scratch\nLABEL infra.kind=test infra.test-prune={token} n={n}\n"
            image, _ = docker_client.images.build(
                fileobj=io.BytesIO(dockerfile.encode()), tag=f"infra-test-prune-{token}:a", rm=True
            )
            if n == 1:
                dangling = image.id
        result = cli("prune", "--images", "--dry-run", "--json", workdir=wd)
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        listed = {i["id"]: i for i in doc["images"]}
        assert listed[dangling] == {"id": dangling, "tags": [], "size": 0, "reason": "dangling", "removed": False}
        assert doc["bytes"] == sum(i["size"] for i in doc["images"])
        assert f"would remove image {dangling[:19]} (dangling, 0 B)" in result.stderr
        assert docker_client.api.images(filters={"label": label, "dangling": True}, quiet=True) == [dangling]
    finally:  # the builder's step containers carry the label too
        for c in docker_client.containers.list(all=True, filters={"label": label}):
            c.remove(force=True)
        for image_id in docker_client.api.images(filters={"label": label}, quiet=True):
            docker_client.api.remove_image(image_id, force=True)
