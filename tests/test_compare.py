"""`infra compare`, `infra ls` and `infra status` on experiment directories made by a real study.

One module-scoped study with the local backend (real training processes on the demo database, one
epoch, 300 variants): model ridge, linear and the `boom` plugin model × train.seed 0 and 1; ridge and
linear succeed, boom fails at its first step. Hand-made copies of those directories are tampered for
the bad paths. tests/test_compare_views.py holds the exact outputs on hand-made experiments.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from runner.errors import UsageError
from runner.run.compare import differing_keys, filter_rows, flatten, group_rows, parse_where
from runner.run.compare_table import to_csv
from runner.run.records import kept_of, kept_text
from tests.helpers import REPO, cli, infra, infra_env
from tests.test_sweep import BOOM

pytestmark = pytest.mark.core
STATUS_SCHEMA = json.loads((REPO / "schemas" / "status.schema.json").read_text())
SMALL = ["--set", "train.max_epochs=1", "--set", "data.limit=300"]
MODELS = 'model=[{"name":"ridge"},{"name":"linear"},{"name":"boom"}]'


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """(workdir, {(model, seed): experiment_id}, study id) after a real 3 × 2 study."""
    from runner.data.importer import build_demo_db

    work = tmp_path_factory.mktemp("compare") / "work"
    shutil.copytree(REPO / "plugins_template", work)
    build_demo_db(work / "data" / "blat_ecolx.db")
    (work / "model" / "boom.py").write_text(BOOM)
    args = ["run", "plans/demo.json", "--backend", "local", *SMALL, "--json"]
    result = infra(*args, "--sweep", MODELS, "--sweep", "train.seed=0,1", workdir=work)
    assert result.returncode == 1, result.stderr[-2000:]
    doc = json.loads(result.stdout)
    ids = {(e["values"]["model"]["name"], e["values"]["train.seed"]): e["experiment_id"] for e in doc["experiments"]}
    states = {k: json.loads((work / "experiments" / i / "status.json").read_text())["state"] for k, i in ids.items()}
    assert states == {
        ("ridge", 0): "succeeded",
        ("ridge", 1): "succeeded",
        ("linear", 0): "succeeded",
        ("linear", 1): "succeeded",
        ("boom", 0): "failed",
        ("boom", 1): "failed",
    }
    return work, ids, doc["study_id"]


def compare_json(work: Path, *args: str) -> dict:
    result = cli("compare", *args, "--json", workdir=work)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def kept_of_dir(work: Path, eid: str) -> str:
    return kept_text(kept_of(json.loads((work / "experiments" / eid / "metrics" / "metrics.json").read_text())))


def test_a_real_study_compares_in_one_readable_table(swept):
    work, ids, study = swept
    result = cli("compare", "--study", study[:-4], workdir=work)  # a unique prefix of the study id
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split()[:3] == ["experiment", "test.spearman", "val.spearman"]
    assert header.split()[-3:] == ["kept", "model.name", "train.seed"]  # the noise (name, metrics, …) is not
    assert max(len(line) for line in result.stdout.splitlines()) <= 120
    cells = {line.split()[0]: line.split() for line in lines}
    assert set(cells) == {ids[m, s] for m in ("ridge", "linear") for s in (0, 1)}  # boom failed: left out
    for (model, seed), eid in ids.items():
        if model != "boom":
            assert cells[eid][-2:] == [model, str(seed)]
            assert " ".join(cells[eid][-4:-2]).endswith(kept_of_dir(work, eid))
    assert "left out: 2 failed (--all shows them)" in result.stderr
    assert f"4 experiments of study {study} (6 points); same in all: embeddings.name=onehot" in result.stderr
    every = cli("compare", "--study", study, "--all", workdir=work)
    assert every.stdout.splitlines()[0].split()[:3] == ["experiment", "state", "test.spearman"]
    assert len(every.stdout.splitlines()) == 7
    grouped = cli("compare", "--study", study, "--group-by", "train.seed", "--all", workdir=work)
    rows = {line.split()[-1]: line for line in grouped.stdout.splitlines()[1:]}
    assert set(rows) == {"ridge", "linear", "boom"}
    assert rows["boom"].startswith("- (0/2) !") and "(2/2)" in rows["ridge"]


def test_status_and_ls_of_a_real_study(swept):
    work, ids, study = swept
    status = infra("status", study, workdir=work)
    assert status.returncode == 0, status.stderr
    assert "points         6: 4 succeeded, 2 failed" in status.stdout
    table = status.stdout.split("\n\n", 1)[1].splitlines()
    assert table[0].split() == [
        "#",
        "experiment",
        "state",
        "test.spearman",
        "kept",
        "duration",
        "model.name",
        "train.seed",
    ]
    assert [line.split()[1] for line in table[1:]] == list(ids.values())
    listed = infra("ls", "--study", study, workdir=work)
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == list(ids.values())
    assert [line.split()[2] for line in listed.stdout.splitlines()[1:]] == [
        "ridge",
        "ridge",
        "linear",
        "linear",
        "boom",
        "boom",
    ]


def test_columns_for_every_differing_plan_key(swept):
    work, ids, _ = swept
    doc = compare_json(work)
    assert doc["differing"] == ["model.name", "train.seed"]
    assert doc["left_out"] == {"failed": 2}
    rows = doc["experiments"]
    # best test Spearman first; equal values (seeds may keep the same fit) by id
    assert [r["experiment_id"] for r in rows] == sorted(
        (r["experiment_id"] for r in rows),
        key=lambda i: (-next(r["test"]["spearman"] for r in rows if r["experiment_id"] == i), i),
    )
    assert rows[0]["plan"]["data.limit"] == 300 and rows[0]["plan"]["train.max_epochs"] == 1
    assert rows[0]["plan"]["data.db"] == str(work / "data" / "blat_ecolx.db")  # the host's path
    human = cli("compare", ids["linear", 0], ids["linear", 1][:12], workdir=work)
    assert human.returncode == 0, human.stderr
    header, *lines = human.stdout.splitlines()
    assert header.split()[:2] == ["experiment", "test.spearman"] and header.split()[-2:] == ["kept", "train.seed"]
    seeds = {line.split()[0]: line.split()[-1] for line in lines}
    assert seeds == {ids["linear", 0]: "0", ids["linear", 1]: "1"}  # the two sweep points are told apart


def test_where_filters_with_json_typed_values(swept):
    work, ids, _ = swept
    linear = compare_json(work, "--where", "model.name=linear")["experiments"]
    assert {r["experiment_id"] for r in linear} == {ids["linear", 0], ids["linear", 1]}
    both = compare_json(work, "--where", "model.name=linear", "--where", "train.seed=1")["experiments"]
    assert [r["experiment_id"] for r in both] == [ids["linear", 1]]
    assert compare_json(work, "--where", 'train.seed="1"')["experiments"] == []  # the text "1" is not the number 1
    bad = cli("compare", "--where", "train.nope=1", workdir=work)
    assert bad.returncode == 2
    assert (
        "--where train.nope: no compared experiment has this plan key; keys: data.covariates, data.dataset"
        in bad.stderr
    )
    malformed = cli("compare", "--where", "model.name", workdir=work)
    assert malformed.returncode == 2 and "--where 'model.name': expected KEY=VALUE" in malformed.stderr


def test_group_by_seed_gives_mean_sd_and_k_of_n(swept):
    work, ids, _ = swept
    doc = compare_json(work, "--group-by", "train.seed", "--all")
    rows = {r["experiment_id"]: r for r in doc["experiments"]}
    groups = {g["config"]["model.name"]: g for g in doc["groups"]}
    linear = groups["linear"]
    values = [rows[ids["linear", s]]["test"]["spearman"] for s in (0, 1)]
    assert linear["n"] == 2 and linear["test"]["spearman"] == {
        "mean": pytest.approx(statistics.fmean(values)),
        "sd": pytest.approx(statistics.stdev(values)),
        "n": 2,
        "of": 2,
        "undefined": 0,
    }
    assert sorted(linear["grouped_over"]["train.seed"]) == [0, 1]
    assert groups["boom"]["n"] == 2 and groups["boom"]["test"] == {} and doc["groups"][-1] is groups["boom"]
    human = cli("compare", "--group-by", "train.seed", "--where", "model.name=linear", workdir=work)
    header, first = human.stdout.splitlines()
    assert header.split()[:3] == ["test.spearman", "val.spearman", "test.pearson"] and header.split()[-1] == "kept"
    assert first.startswith(f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f} (2/2)  ")
    unknown = cli("compare", "--group-by", "train.seeds", workdir=work)
    assert (
        unknown.returncode == 2 and "--group-by train.seeds: no compared experiment has this plan key" in unknown.stderr
    )


def test_csv_to_stdout_and_to_a_file(swept, tmp_path):
    work, ids, _ = swept
    doc = compare_json(work, "--where", "model.name=linear")
    out = cli("compare", "--where", "model.name=linear", "--csv", "-", workdir=work)
    assert out.returncode == 0, out.stderr
    table = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [r["experiment"] for r in table] == [r["experiment_id"] for r in doc["experiments"]]
    assert float(table[0]["test.spearman"]) == doc["experiments"][0]["test"]["spearman"]  # full precision
    assert {r["train.seed"] for r in table} == {"0", "1"} and "model.name" not in table[0]
    target = tmp_path / "grouped.csv"
    grouped = cli("compare", "--group-by", "train.seed", "--all", "--csv", str(target), workdir=work)
    assert grouped.returncode == 0 and f"CSV written to {target}" in grouped.stderr
    rows = list(csv.DictReader(target.open()))
    assert [r["model.name"] for r in rows][-1] == "boom" and rows[-1]["test.spearman.mean"] == ""
    assert rows[-1]["test.spearman.n"] == "0" and rows[-1]["points"] == "2"
    clash = cli("compare", "--json", "--csv", "-", workdir=work)
    assert clash.returncode == 2 and "give --csv a file name" in clash.stderr
    nowhere = cli("compare", "--csv", str(tmp_path / "no" / "x.csv"), workdir=work)
    assert nowhere.returncode == 2 and "does not exist; create it first" in nowhere.stderr


def test_plot_draws_a_png_and_checks_its_path(swept, tmp_path):
    work, _, _ = swept
    target = tmp_path / "side_by_side.png"
    result = cli("compare", "--group-by", "train.seed", "--plot", str(target), workdir=work)
    assert result.returncode == 0, result.stderr
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and target.stat().st_size > 10_000
    ungrouped = cli("compare", "--plot", str(tmp_path / "rows.png"), workdir=work)
    assert ungrouped.returncode == 0 and (tmp_path / "rows.png").exists()
    assert cli("compare", "--plot", str(tmp_path / "x.jpg"), workdir=work).returncode == 2
    missing = cli("compare", "--plot", str(tmp_path / "no" / "x.png"), workdir=work)
    assert missing.returncode == 2 and f"folder {tmp_path / 'no'} does not exist" in missing.stderr


def test_plot_without_matplotlib_names_the_extra(swept, tmp_path):
    work, _, _ = swept
    blocker = tmp_path / "blocker" / "matplotlib"  # a host-only install: importing matplotlib fails
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = {"PYTHONPATH": f"{tmp_path / 'blocker'}{os.pathsep}{REPO}"}
    result = infra("compare", "--plot", str(tmp_path / "p.png"), workdir=work, env=env)  # PYTHONPATH: a process
    assert result.returncode == 3
    assert result.stderr.strip() == (
        "infra: error: --plot needs matplotlib, which this Python lacks; install the plot extra: "
        "pip install 'infra[plot]'"
    )
    assert not (tmp_path / "p.png").exists()


def test_compare_with_plot_never_imports_torch(swept, tmp_path):
    work, _, _ = swept
    code = (
        "import sys\nfrom runner.cli import main\n"
        f"try:\n    main(['compare', '--group-by', 'train.seed', '--plot', {str(tmp_path / 'p.png')!r}])\n"
        "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
        "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=infra_env(work), capture_output=True, text=True, timeout=300, cwd=work
    )
    assert result.returncode == 0, result.stderr


def test_tampered_experiment_files_are_not_followed(swept, tmp_path):
    work, ids, _ = swept
    source = work / "experiments" / ids["linear", 0]
    copy = tmp_path / "work" / "experiments" / "blat-demo-tampered00"
    shutil.copytree(source, copy, symlinks=True)
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"name": "secret", "train": {"lr": 99}}))
    (copy / "config" / "plan.json").unlink()
    (copy / "config" / "plan.json").symlink_to(secret)
    (copy / "metrics" / "metrics.json").write_text("[1, 2, 3]")  # not an object
    status = json.loads((copy / "status.json").read_text())
    (copy / "status.json").write_text(json.dumps({**status, "experiment_id": copy.name}))
    result = cli("compare", "--json", workdir=tmp_path / "work")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["experiments"]
    assert row["plan"] == {} and row["test"] == {} and row["model"] is None
    (copy / "status.json").write_text("{not json")
    damaged = json.loads(cli("compare", "--all", "--json", workdir=tmp_path / "work").stdout)["experiments"]
    assert damaged[0]["state"] == "unreadable"


def test_ls_has_a_header_and_the_main_metric(swept):
    work, ids, _ = swept
    result = infra("ls", workdir=work)
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split() == ["EXPERIMENT", "STATE", "MODEL", "DATA", "KEPT", "TEST", "SPEARMAN", "DURATION", "CREATED"]
    cells = {line.split()[0]: line.split() for line in lines}
    doc = compare_json(work)
    spearman = {r["experiment_id"]: r["test"].get("spearman") for r in doc["experiments"]}
    linear = cells[ids["linear", 0]]
    assert linear[1:4] == ["succeeded", "linear", "BLAT_ECOLX"]
    assert " ".join(linear[4:-4]) == kept_of_dir(work, ids["linear", 0])
    assert linear[-4] == f"{spearman[ids['linear', 0]]:.4f}" and re.fullmatch(r"[0-9]+s|[0-9]+m[0-9]{2}s", linear[-3])
    assert cells[ids["boom", 1]][1:5] == ["failed", "boom", "BLAT_ECOLX", "-"] and cells[ids["boom", 1]][5] == "-"
    listed = json.loads(infra("ls", "--json", workdir=work).stdout)["experiments"]
    for doc in listed:
        jsonschema.validate(doc, STATUS_SCHEMA)
    by_id = {d["experiment_id"]: d for d in listed}
    assert by_id[ids["linear", 1]]["test_spearman"] == spearman[ids["linear", 1]]
    assert by_id[ids["boom", 0]]["test_spearman"] is None and by_id[ids["boom", 0]]["state"] == "failed"


def test_ls_on_a_terminal_is_a_table(swept):
    import pty

    work, ids, _ = swept
    leader, follower = pty.openpty()
    env = {k: v for k, v in infra_env(work).items() if k != "NO_COLOR"} | {"COLUMNS": "200", "TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", "ls"], stdout=follower, stderr=subprocess.PIPE, env=env, cwd=work
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    raw = b"".join(chunks).decode()
    assert "\x1b[1m" in raw  # rich's bold header: the terminal table, not the plain text
    text = re.sub(r"\x1b\[[0-9;]*m", "", raw)
    lines = [line.split() for line in text.splitlines() if line.strip()]
    assert lines[0] == ["EXPERIMENT", "STATE", "MODEL", "DATA", "KEPT", "TEST", "SPEARMAN", "DURATION", "CREATED"]
    assert {line[0] for line in lines[1:]} == set(ids.values())


def test_status_of_a_failed_run_shows_the_error_line(swept):
    work, ids, _ = swept
    exp_dir = work / "experiments" / ids["boom", 0]
    result = cli("status", ids["boom", 0], workdir=work)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert lines["state"] == "failed"
    assert lines["error"] == "RuntimeError: boom on purpose"
    assert lines["log"] == f"{exp_dir / 'container.log'} (infra logs {ids['boom', 0]})"
    doc = json.loads(cli("status", ids["boom", 0], "--json", workdir=work).stdout)
    jsonschema.validate(doc, STATUS_SCHEMA)
    assert doc["failure"] == {
        "message": f"training exited with code 1; see {exp_dir / 'container.log'}",
        "reason": "RuntimeError: boom on purpose",
        "log": str(exp_dir / "container.log"),
    }
    ok = json.loads(cli("status", ids["linear", 0], "--json", workdir=work).stdout)
    assert "failure" not in ok and "error" not in ok


# --- pure parts -------------------------------------------------------------------------------------


def test_flatten_bounds_untrusted_plans():
    deep: dict = {"leaf": 1}
    for _ in range(20):
        deep = {"d": deep}
    flat = flatten({"a": {"b": [1, 2]}, "s": "x" * 1000, "deep": deep, "e": {}, "t": True})
    assert flat["a.b"] == "[1, 2]" and len(flat["s"]) == 200 and flat["t"] is True and flat["e"] == "{}"
    assert max(k.count(".") for k in flat) <= 9
    assert len(flatten({f"k{i}": i for i in range(5000)})) == 1000
    assert flatten([1, 2]) == {}


def test_differing_filter_group_pure():
    rows = [
        {
            "experiment_id": f"e{i}",
            "plan": {"m": m, "seed": s, "lr": 0.1},
            "test": {"spearman": v},
            "val": {},
            "undefined": {},
            "model": None,
            "embedding": None,
        }
        for i, (m, s, v) in enumerate([("a", 0, 0.5), ("a", 1, 0.7), ("b", 0, 0.9), ("b", 1, None)])
    ]
    assert differing_keys(rows) == ["m", "seed"]
    assert [r["experiment_id"] for r in filter_rows(rows, parse_where(["m=b", "seed=0"]))] == ["e2"]
    groups = group_rows(rows, ["seed"], "spearman")
    assert [g["config"] for g in groups] == [{"m": "a"}, {"m": "b"}]  # 0.6 of 2/2 before 0.9 of 1/2
    assert groups[1]["test"]["spearman"] == {"mean": 0.9, "sd": None, "n": 1, "of": 2, "undefined": 0}
    assert groups[0]["test"]["spearman"]["sd"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    with pytest.raises(UsageError, match="expected KEY=VALUE"):
        parse_where(["=1"])


def test_csv_quotes_formula_like_text():
    text = to_csv(["a", "b"], [["=HYPERLINK(1)", -1.5], [None, "@x"]])
    assert text.splitlines() == ["a,b", "'=HYPERLINK(1),-1.5", ",'@x"]
