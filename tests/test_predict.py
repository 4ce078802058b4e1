"""`infra predict`: the core's parsing, per-row errors, top N and saturation on real trained models;
the command end to end with the local backend and in the experiment's own image; its bad paths."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, cli, infra

core = pytest.mark.core


# --- the core, on a real model trained here --------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Real experiments from the demo data (800 rows, 2 epochs): transform none, rank, and a classifier."""
    from runner.core.experiment import run_experiment
    from runner.data.importer import build_demo_db
    from runner.plan.models import Plan

    root = tmp_path_factory.mktemp("predict-core")
    db = root / "blat.db"
    build_demo_db(db)
    out = {}
    for kind in ("none", "rank", "classification"):
        data = {"target": "DMS_score_bin"} if kind == "classification" else {"transform": kind}
        plan = {
            "name": f"p-{kind}",
            "data": {"db": str(db), "limit": 800, **data},
            "model": {"name": "linear"},
            "train": {"max_epochs": 2, "batch_size": 128},
            **({"metrics": ["auc", "spearman"]} if kind == "classification" else {}),
        }
        run_experiment(Plan.model_validate(plan), root / kind)
        out[kind] = root / kind
    return out


def predictor_of(exp: Path):
    from runner.core.predict import load_predictor

    return load_predictor(exp, exp / "ckpts" / "best.ckpt")


def run_core(tmp_path: Path, exp: Path, *args: str, process: bool = False) -> tuple[int, Path, str]:
    """`python -m runner.core.predict --exp-dir EXP --checkpoint best.ckpt --out OUT ARGS`: (exit code, OUT, stderr).

    The module's `main()` in this process (torch is loaded here already: a process costs ~5 s of
    imports per call), with its stdout, stderr and logging set back afterwards; `process=True` runs the
    entry point as a real process (`test_no_mutant_column_empty_input_and_all_bad_rows` does, and the
    local-backend tests below run it as `infra predict` does)."""
    import subprocess

    out = tmp_path / "out.csv"
    argv = ["--exp-dir", str(exp), "--checkpoint", str(exp / "ckpts" / "best.ckpt"), "--out", str(out), *args]
    if process:
        proc = subprocess.run(
            [sys.executable, "-m", "runner.core.predict", *argv],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        return proc.returncode, out, proc.stderr
    from runner.core.predict import main

    root, variants = logging.getLogger(), logging.getLogger("runner.core.variants")
    saved = (root.handlers[:], root.level, variants.level)
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        root.handlers[:], variants.level = saved[0], saved[2]
        root.setLevel(saved[1])
    return code, out, err.getvalue()


@core
@pytest.mark.parametrize("transform", ["none", "rank", "classification"])
def test_predictions_equal_the_trainings_own(trained, tmp_path, transform):
    import numpy as np
    import pandas as pd

    exp = trained[transform]
    ref = pd.read_parquet(exp / "artifacts" / "predictions.parquet")
    inp = tmp_path / "in.tsv"
    ref[["mutant", "y_true"]].to_csv(inp, sep="\t", index=False)
    code, out, err = run_core(tmp_path, exp, "--input", str(inp))
    assert code == 0, err
    got = pd.read_csv(out, keep_default_na=False)
    assert list(got.columns) == ["mutant", "y_true", "sequence", "prediction", "error", "measured", "in_train"]
    assert got["mutant"].tolist() == ref["mutant"].tolist()
    # every row is one of the experiment's measured variants; in_train exactly for the training split's
    assert (got["measured"] == True).all()  # noqa: E712 (pandas reads the bare words as bools)
    assert got["in_train"].tolist() == (ref["split"] == "train").tolist()
    np.testing.assert_allclose(got["prediction"].to_numpy(float), ref["y_pred"].to_numpy(), rtol=1e-6, atol=1e-6)
    twin = pd.read_csv(exp / "artifacts" / "predictions.csv", keep_default_na=False)
    assert twin["sequence"].tolist() == got["sequence"].tolist()  # the run's CSV twin carries the sequence
    for column in ("id", "mutant", "split"):
        assert twin[column].tolist() == ref[column].tolist()


@core
def test_bad_rows_keep_an_error_and_no_prediction(trained, tmp_path):
    import pandas as pd

    exp = trained["none"]
    template = json.loads((exp / "config" / "predict.json").read_text())["sources"][0]["template"]
    rows = ["H24A", "X1A", "H24Z9", "A9999G", f"{template[0]}1A:B", "", "h24a", "M1A:S2*", "H24?", "Q4K\nQ5K"]
    rows += ["H24A:H24C", "H24Z", " H24A ", "WT"]
    pd.DataFrame({"mutant": rows, "other": range(len(rows))}).to_csv(tmp_path / "in.csv", index=False)
    code, out, err = run_core(tmp_path, exp, "--input", str(tmp_path / "in.csv"), "--summary", str(tmp_path / "s.json"))
    assert code == 0, err
    got = pd.read_csv(out, keep_default_na=False)
    assert got["mutant"].tolist() == rows
    error = dict(zip(got["mutant"], got["error"], strict=True))
    assert error["H24A"] == error[""] == error["h24a"] == error["M1A:S2*"] == error[" H24A "] == error["WT"] == ""
    # the importer's words (runner.data.mutants), naming the template's residue
    assert error["X1A"] == f"wild type 'X' at position 1 does not match the template's {template[0]!r}"
    assert error["H24Z9"].startswith("malformed at 'H24Z9'; expected") and error["M1A:B"].startswith("malformed at 'B'")
    assert error["A9999G"] == f"position 9999 is outside the template (length {len(template)})"
    assert error["H24?"].startswith("malformed") and error["Q4K\nQ5K"].startswith("malformed")
    assert error["H24A:H24C"] == "mutates position 24 twice (H24A and H24C)"
    assert error["H24Z"].startswith("new residue 'Z' at position 24 is not one of the 20 standard amino acids")
    bad = got["error"] != ""
    assert (got.loc[bad, "prediction"] == "").all() and (got.loc[bad, "sequence"] == "").all()
    assert got.loc[got["mutant"] == "", "sequence"].item() == template
    assert (
        got.loc[got["mutant"] == "h24a", "prediction"].item() == got.loc[got["mutant"] == "H24A", "prediction"].item()
    )
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["errors"] == 8 and summary["predicted"] == 6
    assert summary["errors_by_reason"] == {
        "malformed": 4, "duplicate": 1, "nonstandard": 1, "out_of_range": 1, "mismatch": 1
    }  # fmt: skip
    assert summary["columns"] == ["mutant", "other", "sequence", "prediction", "error", "measured", "in_train"]


@core
def test_residue_outside_the_vocab_is_a_row_error(trained, tmp_path):
    import numpy as np
    import pyarrow as pa

    from runner.core.predict import mutant_text
    from runner.core.vocab import BaseVocabProcessor

    predictor = predictor_of(trained["none"])
    predictor.vocab = BaseVocabProcessor("ACDEFGHIKLMNPQRSTVWY")  # no stop, no extended codes
    scored = predictor.score(mutant_text(pa.array(["H24A", "H24*", "H24B"])))
    assert scored.reason.tolist() == [0, 6, 3]  # unknown_residue (no stop in this vocab), nonstandard
    errors = predictor.errors(scored).to_pylist()
    assert errors[0] is None and errors[1].startswith("new residue '*' at position 24 is not in the experiment's vocab")
    assert np.isfinite(scored.prediction[0]) and np.isnan(scored.prediction[1:]).all()


@core
def test_saturation_is_19_per_position_and_top_n_is_the_best(trained, tmp_path):
    import pandas as pd

    exp = trained["none"]
    template = json.loads((exp / "config" / "predict.json").read_text())["sources"][0]["template"]
    code, out, err = run_core(tmp_path, exp, "--saturation")
    assert code == 0, err
    full = pd.read_csv(out, keep_default_na=False)
    assert len(full) == 19 * len(template) and (full["error"] == "").all()
    code, top_out, err = run_core(tmp_path, exp, "--saturation", "--top", "10", "--format", "parquet")
    assert code == 0, err
    top = pd.read_parquet(top_out)
    best = full.sort_values("prediction", ascending=False, kind="stable").head(10)
    assert top["mutant"].tolist() == best["mutant"].tolist()
    assert top["prediction"].is_monotonic_decreasing


@core
def test_top_n_merges_chunks_like_one_sort(trained, tmp_path):
    import numpy as np
    import pyarrow.parquet as pq

    from runner.core.predict import mutant_text, predict_to_file, saturation_mutants

    predictor = predictor_of(trained["rank"])
    mutants = saturation_mutants(predictor.template, predictor.vocab)
    chunks = [mutants.slice(s, 97) for s in range(0, len(mutants), 97)]  # many small chunks
    summary = predict_to_file(predictor, iter(chunks), tmp_path / "top.parquet", "parquet", top=25)
    assert summary["rows"] == len(mutants) and summary["written"] == 25
    full = predictor.score(mutant_text(mutants)).prediction
    expect = np.asarray(mutants.to_pylist())[np.argsort(-full, kind="stable")[:25]]
    assert pq.read_table(tmp_path / "top.parquet").column("mutant").to_pylist() == expect.tolist()


@core
def test_no_mutant_column_empty_input_and_all_bad_rows(trained, tmp_path):
    exp = trained["none"]
    (tmp_path / "x.csv").write_text("variant,score\nH24A,1\n")
    # the entry point as a process: its exit code and its message on stderr
    code, out, err = run_core(tmp_path, exp, "--input", str(tmp_path / "x.csv"), process=True)
    assert code == 2 and "no 'mutant' column (columns: variant, score)" in err and not out.exists()
    (tmp_path / "empty.csv").write_text("mutant\n")
    code, out, err = run_core(tmp_path, exp, "--input", str(tmp_path / "empty.csv"))
    assert code == 2 and "no rows to predict" in err and not out.exists()
    assert not list(tmp_path.glob(".out.csv.*"))  # the temporary file is gone too
    (tmp_path / "bad.csv").write_text("mutant\nZ1A\nfoo\n")
    code, out, err = run_core(tmp_path, exp, "--input", str(tmp_path / "bad.csv"))
    assert code == 2 and "none of the 2 rows could be predicted" in err
    assert out.read_text().count("\n") == 3  # written anyway: the error column says why


def known_variants(exp: Path) -> tuple[str, str, str]:
    """(a mutant of the training split, a measured mutant outside it, a single mutant never measured)."""
    import numpy as np
    import pandas as pd

    selected = pd.read_parquet(exp / "data" / "selected.parquet")
    in_train = selected["id"].isin(np.load(exp / "splits" / "train.npy"))
    singles = selected["mut_num"] == 1
    template = json.loads((exp / "config" / "predict.json").read_text())["sources"][0]["template"]
    measured = set(selected["sequence"])
    new = next(
        f"{wt}{pos}{aa}"
        for pos, wt in enumerate(template, start=1)
        for aa in "ACDEFGHIKLMNPQRSTVWY"
        if aa != wt and template[: pos - 1] + aa + template[pos:] not in measured
    )
    return selected.loc[in_train & singles, "mutant"].iloc[0], selected.loc[~in_train & singles, "mutant"].iloc[0], new


@core
def test_input_columns_are_kept_as_text_and_flags_say_measured_and_in_train(trained, tmp_path):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    exp = trained["none"]
    train, held_out, new = known_variants(exp)
    (tmp_path / "in.csv").write_text(
        "id,mutant,note,sequence\n"
        f'007,{train},"a note, with a comma",x1\n'
        f"008,{held_out},,x2\n"
        f"009,{new},new design,x3\n"
        "010,H24A:H24C,typo,x4\n"
    )
    code, out, err = run_core(tmp_path, exp, "--input", str(tmp_path / "in.csv"), "--summary", str(tmp_path / "s.json"))
    assert code == 0, err
    header = ["mutant", "id", "note", "input_sequence", "sequence", "prediction", "error", "measured", "in_train"]
    lines = out.read_text().splitlines()
    assert lines[0] == ",".join(f'"{h}"' for h in header)
    # text exactly as in the file (the id keeps its zeros), every text cell quoted, flags bare words
    assert lines[1].startswith(f'"{train}","007","a note, with a comma","x1","') and lines[1].endswith(",,true,true")
    assert lines[2].startswith(f'"{held_out}","008","","x2",') and lines[2].endswith(",,true,false")
    assert lines[3].startswith(f'"{new}","009","new design","x3",') and lines[3].endswith(",,false,false")
    assert lines[4] == '"H24A:H24C","010","typo","x4",,,"mutates position 24 twice (H24A and H24C)",,'
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["columns"] == header and summary["measured"] == 2 and summary["in_train"] == 1

    code, out, err = run_core(tmp_path, exp, "--input", str(tmp_path / "in.csv"), "--format", "parquet", "--top", "3")
    assert code == 0, err
    table = pq.read_table(out)
    assert table.column_names == header and len(table) == 3
    assert table.schema.field("id").type == pa.large_string() and table.schema.field("measured").type == pa.bool_()
    flags = pd.DataFrame({c: table.column(c).to_pylist() for c in ("id", "measured", "in_train")}).set_index("id")
    assert flags.loc["007"].tolist() == [True, True] and flags.loc["009"].tolist() == [False, False]


@core
def test_an_experiment_without_its_data_files_gets_empty_flags(trained, tmp_path, caplog):
    import pandas as pd

    caplog.set_level(logging.INFO, logger="runner.core.predict")

    old = tmp_path / "old"
    shutil.copytree(trained["none"], old)
    train, _, _ = known_variants(old)
    (tmp_path / "in.csv").write_text(f"mutant\n{train}\n")
    (old / "splits" / "train.npy").unlink()
    code, out, err = run_core(tmp_path, old, "--input", str(tmp_path / "in.csv"), "--summary", str(tmp_path / "s.json"))
    assert code == 0, err
    assert out.read_text().splitlines()[1].endswith(",,true,")  # measured known, in_train not
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["measured"] == 1 and summary["in_train"] is None and "in_train: cannot tell" in caplog.text
    caplog.clear()
    (old / "data" / "selected.parquet").unlink()
    code, out, err = run_core(tmp_path, old, "--input", str(tmp_path / "in.csv"), "--summary", str(tmp_path / "s.json"))
    assert code == 0, err
    got = pd.read_csv(out, keep_default_na=False)
    assert got["measured"].tolist() == got["in_train"].tolist() == [""]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["measured"] is None and summary["in_train"] is None
    assert caplog.text.count("measured/in_train: cannot tell") == 1  # one line, not one per chunk


@core
def test_importer_and_predict_give_the_same_verdict_and_message(trained, tmp_path):
    """One parser: every mutant of the table gets the same verdict, and a refused one the same
    message, from `infra data import` and from prediction (against the same template)."""
    import csv

    import pandas as pd

    from runner.data.importer import import_csv
    from runner.errors import DataError, shorten

    exp = trained["none"]
    t = json.loads((exp / "config" / "predict.json").read_text())["sources"][0]["template"]
    wrong = "A" if t[23] != "A" else "G"
    mutants = {
        f"{t[23]}24A:{t[23]}24C": "mutates position 24 twice",  # one position twice
        f"{t[0]}1A:{t[23]}24C:{t[0]}1G": "mutates position 1 twice",
        **{f"{t[23]}24{x}": f"new residue {x!r} at position 24 is not one of" for x in "ZBXJUO"},  # ambiguous, rare
        f"{wrong}24A": f"wild type {wrong!r} at position 24 does not match the template's {t[23]!r}",
        f"{t[0]}{len(t) + 1}A": f"position {len(t) + 1} is outside the template (length {len(t)})",
        f"{t[0]}0A": "position 0 is outside the template",
        f"{t[23]}24": f"malformed at '{t[23]}24'",
        f"{t[23]}24A:": "malformed at ''",
        f"{t[23]}24A;{t[24]}25A": "malformed at",
        "24A": "malformed at '24A'",
        f"*24{t[23]}": "malformed at",
        f"{t[23]}24é": "malformed at",
        f"{t[23]}1234567890A": "malformed at",
        f"{t[23]}24A\n{t[24]}25A": "malformed at",  # a quoted line break: one row, quoted as \\n in both
    }
    fine = [f"{t[23]}24*", f"{t[23].lower()}24a", "WT", "", f"  {t[23]}24A ", f"{t[0]}1A:{t[23]}24C"]
    rows = [*mutants, *fine]
    with open(tmp_path / "in.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["mutant"], *[[m] for m in rows]])
    code, out, err = run_core(tmp_path, exp, "--input", str(tmp_path / "in.csv"))
    assert code == 0, err
    predicted = pd.read_csv(out, keep_default_na=False, dtype=str)
    assert predicted["mutant"].tolist() == rows
    for mutant, error in zip(predicted["mutant"], predicted["error"], strict=True):
        one = tmp_path / "one.csv"
        with open(one, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([["mutant", "DMS_score"], [mutant, "1"]])
        db = tmp_path / "one.sqlite"
        db.unlink(missing_ok=True)
        if mutant in fine:
            assert error == "", (mutant, error)
            assert import_csv(one, db, "A", t).rows == 1
            continue
        assert mutants[mutant] in error, (mutant, error)
        with pytest.raises(DataError) as info:
            import_csv(one, db, "A", t)
        where, said = str(info.value).split(": mutant ", 1)  # where: the file and line (the row's last line)
        assert where.startswith(f"{one}:") and said.startswith(f"{shorten(mutant.strip())}: {error}"), info.value


@core
@pytest.mark.slow
def test_a_million_rows_stream_in_bounded_chunks(trained, tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from runner.core.predict import CHUNK_ROWS, predict_to_file, read_mutants, saturation_mutants

    predictor = predictor_of(trained["none"])
    singles = saturation_mutants(predictor.template, predictor.vocab)
    n = 1_000_000
    mutants = singles.take(pa.array(np.arange(n) % len(singles)))
    table = pa.table({"id": pa.array(np.arange(n).astype(str)), "mutant": mutants, "note": pa.nulls(n, pa.string())})
    with pa.CompressedOutputStream(str(tmp_path / "big.csv.gz"), "gzip") as stream:
        pacsv.write_csv(table.cast(pa.schema([(f.name, pa.string()) for f in table.schema])), stream)
    seen = []
    score = predictor.score

    def spy(text, covariates=None):  # the real parse, checks and output, recording how many rows each call held
        seen.append(len(text))
        return score(text, covariates)

    predictor.score = spy
    # The model itself is the other tests' subject: its one-hot forward on a 2-core machine took 190 s
    # for a million rows here, so this one scores with a cheap stand-in and tests the streaming only.
    predictor.score_tokens = lambda tokens: tokens[:, :8].sum(axis=1, dtype=np.float64)
    summary = predict_to_file(predictor, read_mutants(tmp_path / "big.csv.gz"), tmp_path / "top.csv", top=5)
    assert summary["rows"] == summary["predicted"] == n and sum(seen) == n
    assert max(seen) <= CHUNK_ROWS and len(seen) >= n // CHUNK_ROWS
    assert summary["columns"][:3] == ["mutant", "id", "note"]


@core
def test_an_experiment_from_before_predict_says_so(trained, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(trained["none"], old)
    (old / "config" / "predict.json").unlink()
    code, out, err = run_core(tmp_path, old, "--saturation")
    assert code == 2 and "config/predict.json is missing" in err and "--rerun" in err


# --- the command: local backend -------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> tuple[Path, str]:
    """A workdir from the template with a demo experiment trained by `infra run --backend local`.

    400 variants: the tests predict 300 of them, and the linear model's ridge start on all 4,997 (a dual
    solve per alpha) took most of the training's time."""
    from runner.data.importer import build_demo_db

    work = tmp_path_factory.mktemp("predict-local") / "work"
    shutil.copytree(REPO / "plugins_template", work)
    build_demo_db(work / "data" / "blat_ecolx.db")
    result = infra(
        "run", "plans/demo.json", "--backend", "local", "--set", "train.max_epochs=2", "--set", "data.limit=400",
        "--json", workdir=work,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return work, json.loads(result.stdout)["experiment_id"]


def copy_experiment(work: Path, eid: str, new: str, **record) -> str:
    src, dst = work / "experiments" / eid, work / "experiments" / new
    shutil.copytree(src, dst, symlinks=True)
    doc = json.loads((dst / "status.json").read_text())
    doc.update(experiment_id=new, exp_dir=str(dst), **record)
    (dst / "status.json").write_text(json.dumps(doc))
    return new


@core
@pytest.mark.slow
def test_local_backend_predicts_a_csv_and_saturation_top(local_run, tmp_path):
    import numpy as np
    import pandas as pd

    work, eid = local_run
    ref = pd.read_parquet(work / "experiments" / eid / "artifacts" / "predictions.parquet").head(300)
    ref[["mutant"]].to_csv(tmp_path / "in.csv", index=False)
    out = tmp_path / "p.csv"
    result = cli(
        "predict", eid, str(tmp_path / "in.csv"), "--out", str(out), "--backend", "local", "--json", workdir=work
    )
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(result.stdout)
    assert doc["rows"] == doc["predicted"] == 300 and doc["errors"] == 0 and doc["out"] == str(out)
    assert doc["checkpoint"] == "ckpts/best.ckpt" and doc["format"] == "csv" and doc["seconds"] > 0
    got = pd.read_csv(out)
    np.testing.assert_allclose(got["prediction"], ref["y_pred"], rtol=1e-6, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "p.csv"]  # no scratch folder left

    result = cli("predict", eid, "--saturation", "--top", "10", "--backend", "local", workdir=work, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote 10 rows" in result.stderr
    top = pd.read_csv(tmp_path / f"predictions-{eid}-saturation.csv")  # the default --out
    assert len(top) == 10 and top["prediction"].is_monotonic_decreasing


@core
@pytest.mark.slow
def test_bad_paths_exit_codes_and_messages(local_run, tmp_path):
    work, eid = local_run
    (tmp_path / "in.csv").write_text("mutant\nH24A\n")
    inp = str(tmp_path / "in.csv")

    def run(*args):
        return cli("predict", *args, "--backend", "local", workdir=work, cwd=tmp_path)

    r = run("nope-0000000000", inp)
    assert r.returncode == 4 and "no experiment 'nope-0000000000'" in r.stderr
    r = run(eid, inp, "--top", "0")
    assert r.returncode == 2 and "--top 0: must be a positive number" in r.stderr
    r = run(eid, str(tmp_path / "missing.csv"))
    assert r.returncode == 2 and "missing.csv: cannot be read" in r.stderr
    r = run(eid)
    assert r.returncode == 2 and "INPUT file of mutants or --saturation" in r.stderr
    r = run(eid, inp, "--out", str(tmp_path / "no" / "x.csv"))
    assert r.returncode == 2 and "does not exist or is not writable" in r.stderr
    r = run(eid, inp, "--format", "xlsx")
    assert r.returncode == 2 and "--format 'xlsx'" in r.stderr
    (tmp_path / "bad.csv").write_text("mutant\nZ1A\n")
    r = run(eid, str(tmp_path / "bad.csv"), "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["errors_by_reason"] == {"mismatch": 1}
    (tmp_path / "cols.csv").write_text("variant\nH24A\n")
    r = run(eid, str(tmp_path / "cols.csv"))
    assert r.returncode == 2 and "no 'mutant' column" in r.stderr

    failed = copy_experiment(work, eid, "demo-failed", state="failed")
    r = run(failed, inp)
    assert r.returncode == 1 and "is failed, not succeeded" in r.stderr

    no_ckpt = copy_experiment(work, eid, "demo-no-ckpt")
    for ckpt in (work / "experiments" / no_ckpt / "ckpts").glob("*.ckpt"):
        ckpt.unlink()
    r = run(no_ckpt, inp)
    assert r.returncode == 1 and "has no checkpoint (ckpts/best.ckpt or ckpts/last.ckpt)" in r.stderr

    linked = copy_experiment(work, eid, "demo-linked")
    best = work / "experiments" / linked / "ckpts" / "best.ckpt"
    best.unlink()
    best.symlink_to("/etc/passwd")
    out = tmp_path / "keep.csv"
    out.write_text("old\n")
    r = run(linked, inp, "--out", str(out))
    assert r.returncode == 1 and "best.ckpt: is a symbolic link" in r.stderr
    assert out.read_text() == "old\n"  # untouched

    old = copy_experiment(work, eid, "demo-old")
    (work / "experiments" / old / "config" / "predict.json").unlink()
    r = run(old, inp)
    assert r.returncode == 2 and "lacks config/predict.json" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no scratch left


# --- the command: docker, the experiment's own image -----------------------------------------------


@pytest.mark.docker
def test_an_image_shares_prediction_runs_only_when_its_label_says_its_core_can(base_image, docker_client):
    """infra's images carry infra.core_api 2 (`--member`); an image without it (one built by an older
    infra, here the bare OS image the base is made from) gets one prediction run per member."""
    from runner.run.backends import backend_for
    from tests.e2e import BASE_ENV

    backend = backend_for("docker")
    assert backend.predicts_members_together((base_image.tag, base_image.id))
    bare = docker_client.images.get(BASE_ENV["INFRA_BASE_OS"])
    assert "infra.core_api" not in (bare.labels or {})
    assert not backend.predicts_members_together((BASE_ENV["INFRA_BASE_OS"], bare.id))
    assert not backend.predicts_members_together((None, None))


@pytest.mark.docker
@pytest.mark.slow
def test_docker_predict_in_the_experiments_image(base_image, workdir, run_user, docker_client, tmp_path):
    import pandas as pd

    from tests.e2e import chown_to, infra_as, labelled_containers

    # 1,000 variants are enough to compare predictions row by row; the ridge start on all 4,997 cost more
    args = ("run", "plans/demo.json", "--set", "train.max_epochs=3", "--set", "data.limit=1000", "--json")
    result = infra_as(run_user, *args, workdir=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    eid = json.loads(result.stdout)["experiment_id"]
    exp = workdir / "experiments" / eid
    ref = pd.read_parquet(exp / "artifacts" / "predictions.parquet")
    assert (exp / "artifacts" / "predictions.csv").is_file() and (exp / "config" / "predict.json").is_file()
    inp = workdir / "variants.csv"
    ref[["mutant"]].assign(note="x").to_csv(inp, index=False)
    chown_to(run_user, inp)
    out = workdir / "p.parquet"

    r = infra_as(run_user, "predict", eid, str(inp), "--out", str(out), "--json", workdir=workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    assert doc["rows"] == len(ref) and doc["errors"] == 0 and doc["format"] == "parquet"
    got = pd.read_parquet(out)
    assert got["mutant"].tolist() == ref["mutant"].tolist()
    assert (abs(got["prediction"] - ref["y_pred"]) <= 1e-6 * (1 + abs(ref["y_pred"]))).all()
    assert os.stat(out).st_uid == run_user[0]

    r = infra_as(run_user, "predict", eid, "--saturation", "--top", "10", workdir=workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    top = pd.read_csv(workdir / f"predictions-{eid}-saturation.csv")
    assert len(top) == 10 and top["prediction"].is_monotonic_decreasing
    assert labelled_containers(docker_client, workdir) == []  # the prediction container is removed

    # the record is untrusted: an image id that is not the experiment's plugin image is refused
    status = exp / "status.json"
    record = json.loads(status.read_text())
    record["image_id"] = base_image.id  # an infra image, but not a plugin image
    status.write_text(json.dumps(record))
    r = infra_as(run_user, "predict", eid, "--saturation", workdir=workdir)
    assert r.returncode == 1 and "is not infra's plugin image" in r.stderr


@core
@pytest.mark.slow
def test_bench_predict_runs_small(tmp_path):
    import subprocess

    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_predict.py"), "--n", "3000", "--length", "60", "--json", str(out)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["n"] == doc["rows_written"] == 3000
    assert doc["bare_model_per_s"] > 0 and doc["predict_per_s"] > 0 and doc["ratio"] > 0
    assert "ratio" in proc.stderr and "peak RSS" in proc.stderr


@core
def test_several_sources_need_source(trained, tmp_path):
    import pandas as pd

    exp = tmp_path / "multi"
    shutil.copytree(trained["none"], exp)
    state_file = exp / "config" / "predict.json"
    state = json.loads(state_file.read_text())
    first = state["sources"][0]
    state["sources"].append({"name": "OTHER", "template": "A" + first["template"][1:]})
    state_file.write_text(json.dumps(state))
    (tmp_path / "in.csv").write_text("mutant\nA1C\n")
    code, out, err = run_core(tmp_path, exp, "--input", str(tmp_path / "in.csv"))
    assert code == 2 and f"pick one with --source ({first['name']}, OTHER)" in err
    code, out, err = run_core(tmp_path, exp, "--input", str(tmp_path / "in.csv"), "--source", "nope")
    assert code == 2 and "--source 'nope' is not one of" in err
    code, out, err = run_core(tmp_path, exp, "--input", str(tmp_path / "in.csv"), "--source", "OTHER")
    assert code == 0, err
    got = pd.read_csv(out)
    assert got["sequence"].item().startswith("C")
    assert not got["measured"].item() and not got["in_train"].item()  # the measured variants are the first source's


def test_predict_spec_mounts_only_what_prediction_reads_with_the_trainings_limits(tmp_path):
    from runner.errors import UsageError
    from runner.run.jobs import Limits, PredictMember, predict_job
    from runner.run.spec import LABEL_PURPOSE, LABEL_WORKDIR, container_spec, workdir_identity
    from runner.settings import node_settings

    exp = tmp_path / "experiments" / "e1"
    member = PredictMember("e1", exp, "ckpts/best.ckpt", ("config/predict.json",), tmp_path / ".infra-predict-x")
    job = predict_job(
        members=(member,),
        source=tmp_path / "in.csv",
        result_name="result.csv",
        summary_name="summary.json",
        core_args=("--format", "csv"),
        workdir=tmp_path,
        labels={LABEL_PURPOSE: "predict"},
        name="infra-predict-e1-x",
        limits=Limits(memory="1g", cpus=1.5, network="bridge", threads=1),
        timeout_s=60,
    ).with_image("infra-plugins:aaaaaaaaaaaa", "sha256:" + "a" * 64)
    spec = container_spec(job, user=(1000, 1000), settings=node_settings())
    assert [m.describe() for m in spec.mounts] == [
        f"{exp}/ckpts/best.ckpt:/exp/ckpts/best.ckpt:ro",
        f"{exp}/config/predict.json:/exp/config/predict.json:ro",
        f"{tmp_path}/in.csv:/in/input.csv:ro",
        f"{tmp_path}/.infra-predict-x:/out:rw",
    ]
    assert spec.command == (
        "python", "-m", "runner.core.predict", "--exp-dir", "/exp", "--checkpoint", "/exp/ckpts/best.ckpt",
        "--out", "/out/result.csv", "--summary", "/out/summary.json", "--format", "csv",
        "--input", "/in/input.csv", "--workdir", "/workdir",
    )  # fmt: skip
    engine = spec.engine_kwargs()
    assert engine["network_mode"] == "none" and engine["read_only"] is True and "/tmp" in engine["tmpfs"]
    assert engine["cap_drop"] == ["ALL"] and engine["security_opt"] == ["no-new-privileges"]
    assert engine["user"] == "1000:1000" and engine["gpus"] is None
    # the plan's memory and CPUs apply; its network never does (a prediction needs none)
    assert engine["mem_limit"] == "1g" and engine["nano_cpus"] == 1_500_000_000 and job.timeout_s == 60
    assert spec.environment["INFRA_THREADS"] == "1"
    assert spec.labels[LABEL_PURPOSE] == "predict" and spec.labels[LABEL_WORKDIR] == workdir_identity(tmp_path)
    with pytest.raises(UsageError, match="never run as uid 0"):
        container_spec(job, user=(0, 0), settings=node_settings())

    # an ensemble's members of one image: one process, each member's files and output folder apart
    second = PredictMember("e2", tmp_path / "experiments" / "e2", "ckpts/last.ckpt", (), tmp_path / "o2")
    pair = predict_job(
        members=(member, second), source=None, result_name="r.csv", summary_name="s.json", core_args=(),
        workdir=tmp_path, labels={}, name="p", limits=Limits(), timeout_s=10,
    ).with_image("infra-plugins:aaaaaaaaaaaa", "sha256:" + "a" * 64)  # fmt: skip
    spec = container_spec(pair, user=(1000, 1000), settings=node_settings())
    assert [m.describe() for m in spec.mounts] == [
        f"{exp}/ckpts/best.ckpt:/exp/m0/ckpts/best.ckpt:ro",
        f"{exp}/config/predict.json:/exp/m0/config/predict.json:ro",
        f"{tmp_path}/experiments/e2/ckpts/last.ckpt:/exp/m1/ckpts/last.ckpt:ro",
        f"{tmp_path}/.infra-predict-x:/out/m0:rw",
        f"{tmp_path}/o2:/out/m1:rw",
    ]
    assert spec.command == (
        "python", "-m", "runner.core.predict",
        "--member", "/exp/m0", "/exp/m0/ckpts/best.ckpt", "/out/m0/r.csv", "/out/m0/s.json",
        "--member", "/exp/m1", "/exp/m1/ckpts/last.ckpt", "/out/m1/r.csv", "/out/m1/s.json",
        "--workdir", "/workdir",
    )  # fmt: skip
    assert pair.experiment_id == "e1"


class PickledObject:
    """Stands for arbitrary code a checkpoint could carry; weights-only loading must refuse it."""


@core
def test_a_checkpoint_with_pickled_objects_is_refused(trained, tmp_path):
    import torch

    exp = tmp_path / "evil"
    shutil.copytree(trained["none"], exp)
    ckpt = torch.load(exp / "ckpts" / "best.ckpt", weights_only=True)
    torch.save({**ckpt, "extra": PickledObject()}, exp / "ckpts" / "best.ckpt")
    code, out, err = run_core(tmp_path, exp, "--saturation")
    assert code == 2 and "best.ckpt: not a usable checkpoint (UnpicklingError" in err and not out.exists()
