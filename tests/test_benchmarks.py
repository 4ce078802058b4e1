"""The benchmark scripts still run (on tiny inputs) and their fast and naive paths still agree.

These are not timing tests: the numbers are printed by the scripts and recorded in the docs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path) -> str:
    out = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.core
def test_bench_data_small(tmp_path):
    # the e2e stage asserts that load_variants and the naive per-row path give identical outputs
    doc = json.loads(
        _run(
            [
                str(REPO / "benchmarks/bench_data.py"),
                "--n",
                "3000",
                "--naive-n",
                "500",
                "--json",
                "--db",
                str(tmp_path / "synthetic.sqlite"),
            ],
            tmp_path,
        ).splitlines()[-1]
    )
    assert set(doc["results"]) == {"sql", "mutate", "e2e"}
    for r in doc["results"].values():
        assert r["fast"]["n"] == 3000 and r["naive"]["n"] == 500 and r["speedup"] > 0


@pytest.mark.core
def test_bench_train_small(tmp_path):
    report = tmp_path / "train.json"
    _run(
        [
            str(REPO / "benchmarks/bench_train.py"),
            "--device",
            "cpu",
            "--model",
            "mlp",
            "--n",
            "512",
            "--epochs",
            "1",
            "--batch-size",
            "128",
            "--json",
            str(report),
        ],
        tmp_path,
    )
    doc = json.loads(report.read_text())
    assert doc["model"] == "mlp" and doc["plain_samples_per_s"] > 0 and doc["core_samples_per_s"] > 0


@pytest.mark.core
def test_bench_embed_small(tmp_path):
    # the second experiment must hit the cache (the script asserts no model load); rates are printed only
    report = tmp_path / "embed.json"
    _run(
        [str(REPO / "benchmarks/bench_embed.py"), "--n", "64", "--length", "40", "--hidden", "16", "--layers", "1"]
        + ["--batch-size", "16", "--repeats", "1", "--json", str(report)],
        tmp_path,
    )
    doc = json.loads(report.read_text())
    assert doc["n"] == 64 and doc["bare_seq_per_s"] > 0 and doc["plm_seq_per_s"] > 0 and doc["hit_speedup"] > 1


def test_bench_import_small(tmp_path):
    for shape in ("proteingym", "short"):
        doc = json.loads(
            _run(
                [str(REPO / "benchmarks/bench_import.py"), "--shape", shape, "--mb", "0.2", "--dir", str(tmp_path)],
                tmp_path,
            )
        )
        assert doc["rows"] > 500 and doc["rows_per_second"] > 0 and doc["peak_rss_mb"] > 0, doc


@pytest.mark.docker
def test_bench_logs_small(tmp_path, docker_client):
    doc = json.loads(
        _run(
            [str(REPO / "benchmarks/bench_logs.py"), "--flood-mb", "2", "--line-mib", "2", "--json"], tmp_path
        ).splitlines()[-1]
    )
    assert doc["flood"]["live"]["output_mb"] == doc["flood"]["save"]["output_mb"] == 2.0
    assert doc["long_line"]["live"]["kept_mb"] <= 0.1 and doc["tail_1"]["peak_rss_mb"] > 0


@pytest.mark.core
def test_calibrate_runs_and_merges_its_rows(tmp_path, capsys):
    # one BLAT fold of the reference model for real, then the table from the saved rows. The training
    # runs in this process (the core tier has torch loaded; a process would import it again), the table
    # as the script: that one shows the script still runs as one
    import logging

    sys.path.insert(0, str(REPO / "benchmarks"))
    from calibrate import main

    rows = tmp_path / "rows.json"
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    try:
        args = ["--datasets", "blat", "--models", "ridge", "--folds", "1", "--workdir", str(tmp_path / "work")]
        assert main([*args, "--json", str(rows)]) == 0
    finally:
        lightning_log.setLevel(level)
    out = capsys.readouterr().out
    (row,) = json.loads(rows.read_text())
    assert row["dataset"] == "blat" and row["model"] == "ridge" and 0.6 < row["test_spearman"] < 0.9
    table = _run([str(REPO / "benchmarks/calibrate.py"), "--from-json", str(rows)], tmp_path)
    line = next(x for x in table.splitlines() if x.startswith("| BLAT_ECOLX"))
    assert f"| {row['test_spearman']:.3f} | — |" in line and line in out
    # what best.ckpt held: ridge has no start candidate, so its one epoch
    assert row["kept"] == ["epoch 0"] and line.endswith("| epoch 0 |")


def test_calibrate_kept_column():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from calibrate import kept_text

    assert kept_text({"kept": ["start"]}) == "start"
    assert kept_text({"kept": ["start", "epoch 3", "start", "epoch 0", "start"]}) == "start 3/5"
    assert kept_text({"kept": ["epoch 1", "epoch 0"]}) == "epochs"
    assert kept_text({}) == "—"  # a row from before the rule
