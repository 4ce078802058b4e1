"""The trust boundary of a run, attacked (docs/security.md): a hostile plugin in a real container,
planted links and FIFOs in the experiment directory, damaged records, two workdirs with one
experiment id, concurrent runs and a full disk. Every test asserts the exact outcome and exit code.

Runs hold the training on a gate the test opens (`metrics/.gate-open`), never on the clock.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.e2e import chown_to, infra_as, wait_for

HOSTILE = Path(__file__).parent / "attack_workdir" / "model" / "hostile.py"
SHADOW_MARK = "root:"  # what /etc/shadow and /etc/passwd start with


def plan(workdir: Path, exp_id: str, db: Path | None = None, **extra) -> Path:
    doc = {
        "name": "attack",
        "experiment_id": exp_id,
        "data": {"db": str(db or workdir / "data" / "blat_ecolx.db"), "limit": 300},
        "model": {"name": "hostile"},
        "train": {"max_epochs": 1, "batch_size": 64, "early_stopping_patience": 0},
        **extra,
    }
    path = workdir / "plans" / f"{exp_id}.json"
    path.write_text(json.dumps(doc))
    return path


def arm(run_user, workdir: Path, exp_id: str, **cfg) -> Path:
    """Write the plugin's attack configuration where the container will see it (config/attack.json)."""
    exp_dir = workdir / "experiments" / exp_id
    (exp_dir / "config").mkdir(parents=True, exist_ok=True)
    (exp_dir / "config" / "attack.json").write_text(json.dumps(cfg))
    chown_to(run_user, workdir / "experiments", exp_dir, exp_dir / "config", exp_dir / "config" / "attack.json")
    return exp_dir


@pytest.fixture
def hostile_workdir(workdir, run_user):
    shutil.copy(HOSTILE, workdir / "model" / "hostile.py")
    chown_to(run_user, workdir / "model" / "hostile.py")
    return workdir


# --- no engine needed -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "not valid JSON; the record is damaged"),
        (b"\xff\xfe\x00binary", "not valid JSON; the record is damaged"),
        (b"[1, 2]", "not an infra record (a JSON object is expected)"),
        (b'{"state": "running"}', "not an infra record ('experiment_id' missing or not a str)"),
    ],
)
def test_damaged_status_json_is_reported_not_a_traceback(tmp_path, content, reason):
    from tests.test_experiments import make_exp

    good = make_exp(tmp_path, state="succeeded")
    bad_root = good.root.parent / "broken-0000000000"
    shutil.copytree(good.root, bad_root)
    (bad_root / "status.json").write_bytes(content)
    env = {**os.environ, "INFRA_WORKDIR": str(tmp_path)}
    cli = [sys.executable, "-m", "runner"]

    status = subprocess.run([*cli, "status", "broken-0000000000"], capture_output=True, text=True, env=env)
    assert status.returncode == 1
    assert status.stderr.strip() == f"infra: error: {bad_root / 'status.json'}: {reason}"
    assert "Traceback" not in status.stderr

    listing = subprocess.run([*cli, "ls", "--json"], capture_output=True, text=True, env=env)
    assert listing.returncode == 0, listing.stderr
    rows = {r["experiment_id"]: r for r in json.loads(listing.stdout)["experiments"]}
    assert rows[good.id]["state"] == "succeeded"
    assert rows["broken-0000000000"]["state"] == "unreadable"
    assert rows["broken-0000000000"]["message"] == f"{bad_root / 'status.json'}: {reason}"

    compared = subprocess.run([*cli, "compare", "--json"], capture_output=True, text=True, env=env)
    assert compared.returncode == 0, compared.stderr


def test_planted_links_and_fifos_are_never_followed_by_readers(tmp_path):
    from tests.test_experiments import make_exp

    exp = make_exp(tmp_path, state="succeeded")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:top-secret\n")
    (exp.root / "metrics" / "metrics.json").symlink_to(secret)
    os.mkfifo(exp.root / "config" / "plan.json")  # a reader that opened it would block forever
    env = {**os.environ, "INFRA_WORKDIR": str(tmp_path)}
    cli = [sys.executable, "-m", "runner"]
    for args in (["status", exp.id, "--json"], ["compare", "--json"], ["ls", "--json"]):
        result = subprocess.run([*cli, *args], capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode == 0, (args, result.stderr)
        assert "top-secret" not in result.stdout + result.stderr
    status = json.loads(
        subprocess.run([*cli, "status", exp.id, "--json"], capture_output=True, text=True, env=env).stdout
    )
    assert status["state"] == "succeeded" and "test" not in status


def test_records_written_through_a_planted_link_replace_the_link(tmp_path):
    from tests.test_experiments import make_exp

    exp = make_exp(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    exp.status_path.unlink()
    exp.status_path.symlink_to(victim)
    with pytest.raises(Exception, match="symbolic link"):
        exp.read()
    exp.write({"experiment_id": exp.id, "state": "failed", "attempt": 1, "backend": "local"})
    assert victim.read_text() == "keep me\n"
    assert not exp.status_path.is_symlink()
    exp.events_path.symlink_to(victim)
    with pytest.raises(Exception, match="symbolic link"):
        exp.event("state", state="failed")
    assert victim.read_text() == "keep me\n"


# --- against the real engine ------------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.slow
def test_hostile_plugin_is_contained(base_image, hostile_workdir, run_user, docker_client):
    uid, gid, _ = run_user
    wd = hostile_workdir
    # The database sits in a folder with a secret and a socket: only the file may be visible.
    db_dir = wd.parent / "dbdir"
    db_dir.mkdir()
    db = db_dir / "blat.db"
    shutil.copy(wd / "data" / "blat_ecolx.db", db)
    (db_dir / "secret.txt").write_text("root:db-folder-secret\n")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(db_dir / "docker.sock"))
    chown_to(run_user, db_dir, db, db_dir / "secret.txt")
    exp_dir = arm(
        run_user,
        wd,
        "attack-contained",
        symlinks={"artifacts/leak": "/etc/shadow", "metrics/passwd": "/etc/passwd"},
        fifos=["metrics/pipe"],
        setuid=True,
    )
    try:
        result = infra_as(run_user, "run", str(plan(wd, "attack-contained", db=db)), "--json", workdir=wd)
    finally:
        sock.close()
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((exp_dir / "artifacts" / "attack.json").read_text())
    assert (report["uid"], report["gid"]) == (uid, gid) and report["euid"] != 0
    assert int(report["cap_eff"], 16) == 0 and report["no_new_privs"] == "1"
    assert report["exp_entries"] == ["artifacts", "ckpts", "config", "data", "embeddings", "logs", "metrics", "splits"]
    assert report["data_entries"] == ["blat.db"]
    assert report["docker_sock"] is False and report["read_secret"]["ok"] is False
    for key in ("write_status", "write_events", "write_container_log", "replace_metrics_dir"):
        assert report[key]["ok"] is False, key
    assert report["setuid"]["ok"] is True  # it may set the bits on its own file; the host clears them
    assert report["chown_root"]["ok"] is False
    suid = exp_dir / "artifacts" / "suid-sh"
    assert stat.S_IMODE(suid.stat().st_mode) & (stat.S_ISUID | stat.S_ISGID) == 0
    for path in exp_dir.rglob("*"):
        st = path.lstat()
        assert st.st_uid != 0 or not (st.st_mode & (stat.S_ISUID | stat.S_ISGID)), path
    record = json.loads((exp_dir / "status.json").read_text())
    assert record["state"] == "succeeded"
    events = [json.loads(line) for line in (exp_dir / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "tampered" and e["path"] == "artifacts/suid-sh" for e in events)
    status = infra_as(run_user, "status", "attack-contained", "--json", workdir=wd)
    assert status.returncode == 0 and SHADOW_MARK not in status.stdout


@pytest.mark.docker
@pytest.mark.slow
def test_planted_directory_link_before_a_retry_is_a_tampered_failure(base_image, hostile_workdir, run_user):
    wd = hostile_workdir
    exp_dir = arm(run_user, wd, "attack-retry", fail=True)
    first = infra_as(run_user, "run", str(plan(wd, "attack-retry")), workdir=wd)
    assert first.returncode == 1, first.stderr[-2000:]
    elsewhere = Path(tempfile.mkdtemp(prefix="infra-elsewhere-", dir="/tmp"))
    chown_to(run_user, elsewhere)
    shutil.rmtree(exp_dir / "ckpts")
    (exp_dir / "ckpts").symlink_to(elsewhere)  # what a process with the training's uid could do
    retry = infra_as(run_user, "run", str(plan(wd, "attack-retry")), "--json", workdir=wd)
    assert retry.returncode == 1
    error = json.loads(retry.stdout)["error"]
    assert error["message"] == (
        f"{exp_dir / 'ckpts'}: is a symbolic link; the experiment's files were tampered with and are not followed"
    )
    assert list(elsewhere.iterdir()) == []
    record = json.loads((exp_dir / "status.json").read_text())
    assert record["state"] == "failed" and "tampered" in record["message"]


@pytest.mark.docker
@pytest.mark.slow
def test_same_experiment_id_in_two_workdirs_never_touches_the_other(base_image, hostile_workdir, run_user, tmp_path):
    from runner.data.importer import build_demo_db

    wd_a = hostile_workdir
    wd_b = wd_a.parent / "work-b"
    shutil.copytree(wd_a, wd_b)
    (wd_b / "data" / "blat_ecolx.db").unlink()
    build_demo_db(wd_b / "data" / "blat_ecolx.db")
    for path in [wd_b, *wd_b.rglob("*")]:
        chown_to(run_user, path)
    exp_a = arm(run_user, wd_a, "attack-twin", gate=True)
    a = infra_as(run_user, "run", str(plan(wd_a, "attack-twin")), "--detach", "--json", workdir=wd_a)
    assert a.returncode == 0, a.stderr[-2000:]
    b = infra_as(run_user, "run", str(plan(wd_b, "attack-twin")), "--json", workdir=wd_b)
    assert b.returncode == 0, b.stderr[-2000:]
    assert json.loads(b.stdout)["state"] == "succeeded"
    status_a = json.loads(infra_as(run_user, "status", "attack-twin", "--json", workdir=wd_a).stdout)
    assert status_a["state"] == "running"  # B's run did not remove or finalise A's container
    (exp_a / "metrics" / ".gate-open").touch()
    wait_for(
        lambda: (
            json.loads(infra_as(run_user, "status", "attack-twin", "--json", workdir=wd_a).stdout)["state"]
            == "succeeded"
        ),
        300,
        "workdir A's run to finish",
    )
    assert json.loads((exp_a / "metrics" / "metrics.json").read_text())["test"]["spearman"] is not None


@pytest.mark.docker
@pytest.mark.slow
def test_three_concurrent_runs_of_one_plan_share_one_training(base_image, hostile_workdir, run_user):
    wd = hostile_workdir
    exp_dir = arm(run_user, wd, "attack-three", gate=True)
    path = str(plan(wd, "attack-three"))
    runs = [infra_as(run_user, "run", path, "--json", workdir=wd, background=True) for _ in range(3)]
    wait_for(lambda: (exp_dir / "logs" / "events.jsonl").exists(), 300, "the training to start")
    (exp_dir / "metrics" / ".gate-open").touch()
    outs = [p.communicate(timeout=600) for p in runs]
    for proc, (out, err) in zip(runs, outs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert "Traceback" not in err
        assert json.loads(out)["state"] == "succeeded"
    events = [json.loads(line) for line in (exp_dir / "events.jsonl").read_text().splitlines()]
    assert sum(1 for e in events if e.get("state") == "created") == 1  # trained once


@pytest.mark.docker
@pytest.mark.slow
def test_full_disk_mid_run_is_exit_3_and_a_truthful_record(base_image, hostile_workdir, run_user):
    wd = hostile_workdir
    small = Path(tempfile.mkdtemp(prefix="infra-full-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(small)], check=True)
    try:
        chown_to(run_user, small)
        (small / "experiments").mkdir()
        chown_to(run_user, small / "experiments")
        os.symlink(small / "experiments", wd / "experiments.small")
        shutil.rmtree(wd / "experiments", ignore_errors=True)
        (wd / "experiments.small").rename(wd / "experiments")
        exp_dir = arm(run_user, wd, "attack-full", flood_bytes=64 << 20)
        env_min = {"INFRA_MIN_FREE_BYTES": "0"}
        result = infra_as_env(run_user, env_min, "run", str(plan(wd, "attack-full")), "--json", workdir=wd)
        assert result.returncode == 3, result.stderr[-3000:]
        error = json.loads(result.stdout)["error"]
        assert error["type"] == "EnvironmentProblem" and "is full" in error["message"]
        record = json.loads((exp_dir / "status.json").read_text())
        # Not stuck running: the record holds the training's own outcome (it may still have finished on
        # the space its own small files needed) and says that the host's log was cut by the full disk.
        assert record["state"] in ("succeeded", "failed") and record["message"].startswith("disk full")
        assert "[infra: the disk is full; the log is cut here]" in (exp_dir / "container.log").read_text()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def infra_as_env(run_user, extra_env: dict, *args, workdir: Path):
    old = {k: os.environ.get(k) for k in extra_env}
    os.environ.update(extra_env)
    try:
        return infra_as(run_user, *args, workdir=workdir)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
