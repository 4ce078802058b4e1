"""`infra predict` attacked (issue 23): a hostile plugin in the prediction container swaps the result for a
setuid shell, a huge file, a link or formula cells, hogs memory or blocks; a FIFO as input; `--out`
into the experiments folder; a tampered `config/predict.json` or plan; SIGTERM/SIGHUP mid-run.

What must hold: the file at `--out` is always a new file infra wrote (the invoker's, no setid bits),
checked and bounded, or nothing; the container runs with the training's memory limit and a time
limit; nothing is left behind (container, scratch folder). Runs are held by the plugin's own wait
(`/out/.blocked`), never by the clock.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import stat
import tempfile
from pathlib import Path

import pytest

from tests.e2e import chown_to, infra_as, labelled_containers, wait_for
from tests.helpers import REPO, cli, infra

HOSTILE = Path(__file__).parent / "attack_workdir" / "model" / "predict_hostile.py"
TEMPLATE = "MSIQHFRVALIPFFAAFCLPVFAHPETLVKVKDAEDQLGARVGYIELDLNSGKILESFRP"


# --- no engine: the request and the host's delivery of a result -------------------------------------


def succeeded_exp(tmp_path: Path, template: str = TEMPLATE, plan: dict | None = None):
    """A succeeded local-backend experiment record with a checkpoint file and a prediction state."""
    from runner.run.records import plan_sha256
    from tests.test_experiments import make_exp

    plan = plan or {"name": "blat", "data": {"db": "x.db"}, "model": {"name": "linear"}}
    exp = make_exp(tmp_path, state="succeeded", plan_sha256=plan_sha256(plan))
    (exp.root / "ckpts" / "best.ckpt").write_bytes(b"weights")
    state = {"format": 1, "seq_len": len(template), "sources": [{"name": "s", "template": template}]}
    (exp.root / "config" / "predict.json").write_text(json.dumps(state))
    (exp.root / "config" / "plan.json").write_text(json.dumps(plan))
    return exp


def test_a_fifo_as_input_is_refused_at_once(tmp_path):
    exp = succeeded_exp(tmp_path)
    fifo = tmp_path / "in.csv"
    os.mkfifo(fifo)
    # a real process with a deadline: the old code opened the FIFO and blocked forever
    r = infra("predict", exp.id, str(fifo), "--out", str(tmp_path / "p.csv"), workdir=tmp_path, timeout=60)
    assert r.returncode == 2 and f"input {fifo}: a FIFO, not a regular file" in r.stderr, r.stderr
    assert not (tmp_path / "p.csv").exists()


def test_out_inside_the_experiments_folder_is_refused(tmp_path):
    exp = succeeded_exp(tmp_path)
    (tmp_path / "in.csv").write_text("mutant\nH5A\n")
    before = (exp.root / "status.json").read_bytes()
    (tmp_path / "records").symlink_to(tmp_path / "experiments")  # a link to the folder counts too
    for out in (exp.root / "status.json", tmp_path / "experiments" / "p.csv", tmp_path / "records" / exp.id / "x.csv"):
        r = cli("predict", exp.id, str(tmp_path / "in.csv"), "--out", str(out), workdir=tmp_path)
        assert r.returncode == 2, r.stderr
        assert f"--out {out}: inside the experiments folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (exp.root / "status.json").read_bytes() == before


def test_a_tampered_template_length_is_refused(tmp_path):
    from runner.run.jobs import PREDICT_MAX_TEMPLATE

    exp = succeeded_exp(tmp_path, template="M" * (PREDICT_MAX_TEMPLATE + 1))
    r = cli("predict", exp.id, "--saturation", "--out", str(tmp_path / "p.csv"), workdir=tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"config/predict.json has a template or seq_len of {PREDICT_MAX_TEMPLATE + 1:,} residues" in r.stderr


def test_a_tampered_plan_cannot_lift_the_limits(tmp_path):
    exp = succeeded_exp(tmp_path)
    plan = json.loads((exp.root / "config" / "plan.json").read_text())
    (exp.root / "config" / "plan.json").write_text(json.dumps({**plan, "resources": {"memory": "900g"}}))
    r = cli("predict", exp.id, "--saturation", "--out", str(tmp_path / "p.csv"), workdir=tmp_path)
    assert r.returncode == 1 and "config/plan.json: differs from the plan infra wrote" in r.stderr, r.stderr


def test_plan_limits_are_the_trainings_memory_and_cpus(tmp_path):
    from runner.run.predict import plan_limits

    plan = {"name": "blat", "data": {"db": "x.db"}, "model": {"name": "linear"}}
    plan["resources"] = {"memory": "3g", "cpus": 2, "network": "bridge"}
    exp = succeeded_exp(tmp_path, plan=plan)
    limits = plan_limits(exp, exp.read())
    assert (limits.memory, limits.cpus, limits.threads) == ("3g", 2, 2)


def scratch_with(tmp_path: Path, content: bytes | None = None, mode: int = 0o644) -> Path:
    scratch = tmp_path / ".infra-predict-x"
    scratch.mkdir(mode=0o700)
    if content is not None:
        (scratch / "result.csv").write_bytes(content)
        os.chmod(scratch / "result.csv", mode)
    return scratch


GOOD_CSV = (
    b'"mutant","sequence","prediction","error","measured","in_train"\n"H5A","MSIQA",-0.25,,true,false\n'
    b'"X1A",,,"wild-type residue does not match",,\n'
)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_delivered_file_is_a_new_file_of_the_invoker(tmp_path, umask):
    from runner.run.predict import deliver

    scratch = scratch_with(tmp_path, GOOD_CSV, mode=0o6777)
    out = tmp_path / "p.csv"
    old = os.umask(umask)
    try:
        assert deliver(scratch, "result.csv", out, "csv", 1 << 20, "e1") == 2
    finally:
        os.umask(old)
    st = os.stat(out)
    assert stat.S_IMODE(st.st_mode) == 0o644 & ~umask and st.st_uid == os.geteuid()
    assert os.stat(scratch / "result.csv").st_ino != st.st_ino  # a copy, never the container's file
    rows = list(csv.reader(out.open(newline="")))
    assert rows == [["mutant", "sequence", "prediction", "error", "measured", "in_train"],
                    ["H5A", "MSIQA", "-0.25", "", "true", "false"],
                    ["X1A", "", "", "wild-type residue does not match", "", ""]]  # fmt: skip
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\x7fELF\x02\x01\x01\xff\xfe" + b"\0" * 100, "is not a UTF-8 CSV"),
        (
            b"a,b\n1,2\n",
            "is not infra's prediction table (its header is not mutant,sequence,prediction,error,measured,in_train)",
        ),
        (GOOD_CSV + b"H1A,M,1,,,,extra\n", "data row 3 has 7 cells, not 6"),
        (GOOD_CSV + b'H1A,M,"=1+1",,,\n', "data row 3: the prediction is not a number"),
        (GOOD_CSV + b"H1A," + b"M" * 4096 + b",1,,,\n", "bytes, more than the 4,096 its input can give"),
    ],
    ids=["binary", "header", "cells", "prediction", "size"],
)
def test_a_result_that_is_not_infras_table_is_refused(tmp_path, content, why):
    from runner.errors import ExperimentFailed
    from runner.run.predict import deliver

    out = tmp_path / "p.csv"
    out.write_text("old\n")
    with pytest.raises(ExperimentFailed, match="left a result that") as info:
        deliver(scratch_with(tmp_path, content), "result.csv", out, "csv", 4096, "e1")
    assert why in info.value.message and out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".infra-predict-x", "p.csv"]


def test_a_link_or_fifo_result_is_refused_without_blocking(tmp_path):
    from runner.errors import ExperimentFailed
    from runner.run.predict import deliver

    scratch = scratch_with(tmp_path)
    (scratch / "result.csv").symlink_to("/etc/passwd")
    with pytest.raises(ExperimentFailed, match="cannot be opened as a file"):
        deliver(scratch, "result.csv", tmp_path / "p.csv", "csv", 1 << 20, "e1")
    (scratch / "result.csv").unlink()
    os.mkfifo(scratch / "result.csv")
    with pytest.raises(ExperimentFailed, match="left a result that is a FIFO"):
        deliver(scratch, "result.csv", tmp_path / "p.csv", "csv", 1 << 20, "e1")
    assert not (tmp_path / "p.csv").exists()


def test_parquet_is_written_by_the_host_from_the_checked_rows(tmp_path):
    import pyarrow.parquet as pq

    from runner.run.predict import deliver

    # the container's bytes never become the Parquet file: the host writes it from the checked CSV
    scratch = scratch_with(tmp_path, GOOD_CSV, mode=0o4755)
    (scratch / "result.parquet").write_bytes(b"PAR1" + b"x" * 64 + b"PAR1")
    assert deliver(scratch, "result.csv", tmp_path / "p.parquet", "parquet", 1 << 20, "e1") == 2
    assert stat.S_IMODE(os.stat(tmp_path / "p.parquet").st_mode) & 0o7000 == 0
    assert pq.read_table(tmp_path / "p.parquet").column("mutant").to_pylist() == ["H5A", "X1A"]


def test_formula_cells_get_a_leading_quote_numbers_do_not(tmp_path):
    from runner.run.predict import deliver

    content = (
        b'"mutant","sequence","prediction","error","measured","in_train"\n'
        b'"=HYPERLINK(""http://x/"",""a"")","+MK",-1.5e-3,"@SUM(A1)",,\n'
        b'"-2+3","\tM",+2,"\rx",,\n'
    )
    out = tmp_path / "p.csv"
    deliver(scratch_with(tmp_path, content), "result.csv", out, "csv", 1 << 20, "e1")
    rows = list(csv.reader(out.open(newline="")))[1:]
    assert rows == [
        ['\'=HYPERLINK("http://x/","a")', "'+MK", "-0.0015", "'@SUM(A1)", "", ""],  # numbers as Python writes them
        ["'-2+3", "'\tM", "2.0", "'\rx", "", ""],
    ]


# --- the real engine: a hostile plugin model in the prediction container ---------------------------


@pytest.fixture(scope="module")
def hostile(run_user, base_image) -> tuple[Path, str]:
    """(workdir, experiment id): the template workdir plus model/predict_hostile.py, and one docker training
    of it with resources.memory 1g (the limit the prediction must inherit)."""
    from runner.data.importer import build_demo_db

    uid, gid, _ = run_user
    top = Path(tempfile.mkdtemp(prefix="infra-e2e-predict-", dir="/tmp"))  # the run user must enter it
    work = top / "work"
    shutil.copytree(REPO / "plugins_template", work)
    shutil.copy(HOSTILE, work / "model" / "predict_hostile.py")
    build_demo_db(work / "data" / "blat_ecolx.db")
    plan = {
        "name": "predattack",
        "data": {"db": str(work / "data" / "blat_ecolx.db"), "limit": 300},
        "model": {"name": "predict_hostile"},
        "train": {"max_epochs": 1, "batch_size": 64, "early_stopping_patience": 0},
        "resources": {"memory": "1g"},
    }
    (work / "plans" / "attack.json").write_text(json.dumps(plan))
    for path in [top, work, *work.rglob("*")]:
        os.chown(path, uid, gid)
    r = infra_as(run_user, "run", "plans/attack.json", "--json", workdir=work)
    assert r.returncode == 0, r.stderr[-3000:]
    yield work, json.loads(r.stdout)["experiment_id"]
    shutil.rmtree(top, ignore_errors=True)


def attack_input(work: Path, run_user, attack: str, mutants=("H24A", "H24C")) -> Path:
    path = work / f"in-{attack}.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["mutant", "attack"])
        writer.writerows([m, attack] for m in mutants)
    chown_to(run_user, path)
    return path


def left_behind(work: Path, docker_client) -> list:
    """What a prediction must never leave: its container, a scratch folder, a temporary output."""
    stray = [p.name for p in work.iterdir() if p.name.startswith(".infra-predict-") or p.name.endswith(".tmp")]
    return stray + [c.name for c in labelled_containers(docker_client, work)]


def setid_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.is_file() and os.lstat(p).st_mode & (stat.S_ISUID | stat.S_ISGID)]


@pytest.mark.docker
@pytest.mark.slow
def test_a_setuid_shell_swapped_in_for_the_result_never_reaches_out(hostile, run_user, docker_client):
    work, eid = hostile
    out = work / "p-setuid.csv"
    r = infra_as(run_user, "predict", eid, str(attack_input(work, run_user, "setuid")), "--out", str(out), workdir=work)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"prediction with {eid} left a result that is not" in r.stderr  # a binary, not infra's table
    assert not out.exists() and setid_files(work) == [] and left_behind(work, docker_client) == []


@pytest.mark.docker
@pytest.mark.slow
def test_a_setuid_mode_on_a_valid_table_is_not_handed_over(hostile, run_user, docker_client):
    work, eid = hostile
    out = work / "p-mode.csv"
    r = infra_as(
        run_user, "predict", eid, str(attack_input(work, run_user, "setuid_table")), "--out", str(out), workdir=work
    )
    assert r.returncode == 0 and "predicted 2 of 2 rows" in r.stderr, r.stderr[-2000:]
    st = os.lstat(out)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == run_user[0]
    assert stat.S_IMODE(st.st_mode) & 0o7022 == 0  # 0644 & ~umask: no setid bits, not group/other writable
    assert [row[0] for row in csv.reader(out.open(newline=""))] == ["mutant", "H24A", "H24C"]
    assert left_behind(work, docker_client) == []


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize(
    ("attack", "why"),
    [("huge", "bytes, more than the"), ("link", "cannot be opened as a file (Too many levels of symbolic links)")],
)
def test_a_huge_or_linked_result_is_refused(hostile, run_user, docker_client, attack, why):
    work, eid = hostile
    out = work / f"p-{attack}.csv"
    r = infra_as(run_user, "predict", eid, str(attack_input(work, run_user, attack)), "--out", str(out), workdir=work)
    assert r.returncode == 1 and why in r.stderr, r.stderr[-2000:]
    assert not out.exists() and left_behind(work, docker_client) == []


@pytest.mark.docker
@pytest.mark.slow
def test_formula_cells_from_the_input_or_the_container_are_neutralised(hostile, run_user, docker_client):
    work, eid = hostile
    out = work / "p-formula.csv"
    # the plugin rewrites the result with formulas in every text cell; its mutant and input cells are
    # the input's own (the host refuses a result whose rows differ from INPUT's), the rest its own.
    # A double mutant: not among the measured single mutants, so the rewrite's empty flags agree
    # with the core's summary (which the host checks the rows against)
    inp = work / "in-formula.csv"
    rows = [["mutant", "attack"], ["H24A:S2A", "formula"], ["@SUM(1+1)*cmd|' /C calc'!A0", "-1+1"]]
    with inp.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    chown_to(run_user, inp)
    r = infra_as(run_user, "predict", eid, str(inp), "--out", str(out), workdir=work)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.reader(out.open(newline="")))[1:]
    assert rows[0][2].startswith("'=HYPERLINK(") and rows[0][3] == "-0.5"  # a negative number stays a number
    assert rows[1] == ["'@SUM(1+1)*cmd|' /C calc'!A0", "'-1+1", "'+MKS", "", "'-2+3", "", ""]

    # the core copies an input's mutant text into the output: a formula there is neutralised too
    inp = attack_input(work, run_user, "none", mutants=("=cmd|' /C calc'!A0", "H24A"))
    r = infra_as(run_user, "predict", eid, str(inp), "--out", str(out), workdir=work)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [row[0] for row in csv.reader(out.open(newline=""))] == ["mutant", "'=cmd|' /C calc'!A0", "H24A"]
    assert left_behind(work, docker_client) == []


@pytest.mark.docker
@pytest.mark.slow
def test_the_trainings_memory_limit_stops_a_hog(hostile, run_user, docker_client):
    work, eid = hostile
    out = work / "p-memory.csv"
    r = infra_as(run_user, "predict", eid, str(attack_input(work, run_user, "memory")), "--out", str(out), workdir=work)
    # resources.memory 1g: the 2 GiB allocation is killed by the kernel (137), as in the training
    assert r.returncode == 1 and f"prediction with {eid} failed (exit 137)" in r.stderr, r.stderr[-2000:]
    assert not out.exists() and left_behind(work, docker_client) == []


@pytest.mark.docker
@pytest.mark.slow
def test_a_blocked_prediction_is_stopped_at_the_time_limit(hostile, run_user, docker_client):
    work, eid = hostile
    out = work / "p-block.csv"
    inp = attack_input(work, run_user, "block")
    r = infra_as(run_user, "predict", eid, str(inp), "--out", str(out), "--timeout", "3", workdir=work)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"prediction with {eid} did not finish within 3 s (--timeout); it was stopped" in r.stderr
    assert not out.exists() and left_behind(work, docker_client) == []


def python_child(pid: int) -> int:
    """The infra process under `runuser` (signalled itself: runuser SIGKILLs its child 2 s after a SIGTERM)."""
    if os.geteuid() != 0:
        return pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0]) if children else pid


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_mid_prediction_removes_container_and_scratch(hostile, run_user, docker_client, signum):
    work, eid = hostile
    out = work / "p-signal.csv"
    inp = attack_input(work, run_user, "block")
    proc = infra_as(run_user, "predict", eid, str(inp), "--out", str(out), workdir=work, background=True)
    try:
        # held: the plugin waits in the container, its marker in the member's folder (m0) of the scratch folder beside --out
        wait_for(lambda: list(work.glob(".infra-predict-*/m0/.blocked")), 300, "the prediction to block")
        os.kill(python_child(proc.pid), signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and f"prediction with {eid} interrupted" in err, err[-2000:]
    assert not out.exists() and left_behind(work, docker_client) == []
