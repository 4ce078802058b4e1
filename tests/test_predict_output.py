"""`infra predict`'s host side without an engine: the core's result read as untrusted rows (the
contract's header for this input, flags and numbers checked), infra's own CSV/Parquet written from
them, the ensemble's streamed merge and ranking, stdout and the table, the request's checks
(members of a study, --rank, --json with --out -). Host tier: no torch."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from pathlib import Path

import pytest

from tests.helpers import cli

TEMPLATE = "MSIQHFRVALIPFFAAFCLPVFAHPETLVKVKDAEDQLGARVGYIELDLNSGKILESFRP"
TAIL = ["sequence", "prediction", "error", "measured", "in_train"]


def result_csv(rows: list[list], inputs: tuple[str, ...] = ()) -> bytes:
    """A core result in the contract's encoding: text quoted, numbers and flags bare."""

    def cell(value, i):
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return repr(value)
        return '"' + str(value).replace('"', '""') + '"'

    header = ",".join(f'"{h}"' for h in ["mutant", *inputs, *TAIL])
    return (header + "\n" + "".join(",".join(cell(v, i) for i, v in enumerate(r)) + "\n" for r in rows)).encode()


def member_dir(tmp_path: Path, name: str, content: bytes) -> Path:
    folder = tmp_path / name
    folder.mkdir(mode=0o700)
    (folder / "result.csv").write_bytes(content)
    return folder


def rows_of(folder: Path, inputs=(), bound=1 << 20, eid="e1"):
    from runner.run.predict import refusal
    from runner.run.predict_io import open_result, read_result

    refuse = refusal(eid, "out.csv")
    return read_result(open_result(folder, "result.csv", bound, refuse), tuple(inputs), refuse)


# --- the result, checked -----------------------------------------------------------------------------


def test_input_columns_are_the_inputs_header_with_clashes_renamed(tmp_path):
    import gzip

    from runner.run.predict_io import input_columns

    (tmp_path / "a.csv").write_text('id,mutant,"note, long",prediction,n\nx,H5A,y,1,2\n')
    assert input_columns(tmp_path / "a.csv") == ("id", "note, long", "input_prediction", "input_n")
    with gzip.open(tmp_path / "b.tsv.gz", "wt") as fh:
        fh.write("mutant\tsequence\tscore\nH5A\tM\t1\n")
    assert input_columns(tmp_path / "b.tsv.gz") == ("input_sequence", "score")
    assert input_columns(None) == ()  # a saturation has no input columns


def test_a_result_with_input_columns_and_flags_is_read_row_by_row(tmp_path):
    folder = member_dir(
        tmp_path,
        "m0",
        result_csv([["H5A", "7", "MSIQA", -0.25, None, True, False], ["X1A", "8", None, None, "mismatch", None, None]],
                   ("id",)),
    )  # fmt: skip
    rows = list(rows_of(folder, ("id",)))
    assert [(r.mutant, r.inputs, r.prediction, r.error, r.measured, r.in_train) for r in rows] == [
        ("H5A", ["7"], -0.25, "", True, False),
        ("X1A", ["8"], None, "mismatch", None, None),
    ]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (result_csv([["H5A", "MSIQA", 1.0, None, True, False]]), "its header is not mutant,id,sequence"),
        (result_csv([["H5A", "1", "M", 1.0, None, "yes", False]], ("id",)), "measured/in_train is not true, false"),
        (result_csv([["H5A", "1", "M", "=1+1", None, True, False]], ("id",)), "the prediction is not a number"),
        (result_csv([["H5A", "1", "M", 1.0, None, True]], ("id",)), "data row 1 has 6 cells, not 7"),
    ],
    ids=["header-without-input-column", "flag", "prediction", "cells"],
)
def test_a_result_that_is_not_the_contracts_table_is_refused(tmp_path, content, why):
    from runner.errors import ExperimentFailed

    with pytest.raises(ExperimentFailed, match="left a result that") as info:
        list(rows_of(member_dir(tmp_path, "m0", content), ("id",)))
    assert why in info.value.message


def test_deliver_neutralises_formulas_in_every_text_cell_input_columns_too(tmp_path):
    from runner.run.predict import deliver

    content = result_csv([["=cmd|' /C calc'!A0", "@SUM(1)", "+MK", None, "-2+3", None, None]], ("note",))
    folder = member_dir(tmp_path, "m0", content)
    assert deliver(folder, "result.csv", tmp_path / "p.csv", "csv", 1 << 20, "e1", ("note",)) == 1
    rows = list(csv.reader((tmp_path / "p.csv").open(newline="")))
    assert rows == [["mutant", "note", *TAIL], ["'=cmd|' /C calc'!A0", "'@SUM(1)", "'+MK", "", "'-2+3", "", ""]]


def test_parquet_output_is_written_by_the_host_with_infras_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from runner.run.predict import deliver

    folder = member_dir(tmp_path, "m0", result_csv([["H5A", "1", "MSIQA", 0.5, None, False, None]], ("id",)))
    (folder / "result.parquet").write_bytes(b"PAR1 planted by the container PAR1")  # never read
    assert deliver(folder, "result.csv", tmp_path / "p.parquet", "parquet", 1 << 20, "e1", ("id",)) == 1
    table = pq.read_table(tmp_path / "p.parquet")
    assert table.schema.names == ["mutant", "id", *TAIL]
    assert table.schema.field("prediction").type == pa.float64() and table.schema.field("measured").type == pa.bool_()
    assert table.to_pylist() == [
        {"mutant": "H5A", "id": "1", "sequence": "MSIQA", "prediction": 0.5, "error": None, "measured": False,
         "in_train": None}
    ]  # fmt: skip


# --- the ensemble's merge and ranking -------------------------------------------------------------------

MUTANTS = ["H5A", "Q4K", "X1A", "M1A", "F6L"]


def members(tmp_path: Path, predictions: list[list], trained: list[list] | None = None) -> list[Path]:
    """One member folder per list of predictions (None: that member could not predict the row)."""
    folders = []
    for m, values in enumerate(predictions):
        rows = []
        for i, (mutant, value) in enumerate(zip(MUTANTS, values, strict=True)):
            in_train = trained[m][i] if trained else False
            error = None if value is not None else "wild-type residue does not match"
            rows.append([mutant, f"id{i}", "MSIQA" if value is not None else None, value, error,
                         None if value is None else i == 0, None if value is None else in_train])  # fmt: skip
        folders.append(member_dir(tmp_path, f"m{m}", result_csv(rows, ("id",))))
    return folders


PREDICTIONS = [[1.0, 0.5, None, 2.0, 0.1], [3.0, 0.6, None, 2.0, None], [2.0, 0.7, None, 2.5, None]]


def merged(tmp_path, rank="mean", predictions=PREDICTIONS, trained=None):
    from runner.run.ensemble import merge, parse_rank

    folders = members(tmp_path, predictions, trained)
    ids = [f"e{i}" for i in range(len(folders))]
    return list(merge([rows_of(f, ("id",), eid=e) for f, e in zip(folders, ids, strict=True)], ids, parse_rank(rank)))


def test_merge_gives_mean_sample_std_and_n_per_variant(tmp_path):
    trained = [[True, False, False, True, False], [True, True, False, False, False], [False] * 5]
    rows = merged(tmp_path, trained=trained)
    assert [r.mutant for r in rows] == MUTANTS and rows[0].inputs == ["id0"]
    first = rows[0]
    assert first.prediction == pytest.approx(2.0) and first.std == pytest.approx(statistics.stdev([1.0, 3.0, 2.0]))
    assert first.n == 3 and first.in_train == 2 and first.measured is True and first.sequence == "MSIQA"
    assert rows[1].in_train == 1 and rows[3].in_train == 1 and rows[1].measured is False
    none = rows[2]  # no member predicted it: the first member's error, nothing else
    assert (none.prediction, none.std, none.n, none.error) == (None, None, 0, "wild-type residue does not match")
    one = rows[4]  # one member: a mean, no spread
    assert (one.prediction, one.std, one.n) == (0.1, None, 1)


def test_ucb_ranks_by_mean_plus_k_std_and_a_single_value_by_its_mean(tmp_path):
    from runner.run.ensemble import parse_rank, top_rows

    rows = merged(tmp_path, "ucb:1.0")
    assert rows[0].ucb == pytest.approx(2.0 + 1.0) and rows[4].ucb == pytest.approx(0.1)
    best, seen = top_rows(iter(rows), 3, parse_rank("ucb:1.0"))
    assert seen == 5 and [r.mutant for r in best] == ["H5A", "M1A", "Q4K"]  # 3.0, 2.1667+0.2887, 0.6+0.1
    (tmp_path / "again").mkdir()
    by_mean, _ = top_rows(iter(merged(tmp_path / "again", "mean")), 2, parse_rank("mean"))
    assert [r.mutant for r in by_mean] == ["M1A", "H5A"]  # 2.1667 > 2.0: the mean alone ranks otherwise


def test_top_n_keeps_the_best_of_a_stream_with_ties_in_input_order():
    import random

    from runner.run.ensemble import Rank, TopN
    from runner.run.predict_io import Row

    rng = random.Random(3)
    values = [rng.choice([0.1, 0.2, 0.3, None, math.nan]) for _ in range(5000)]
    keep = TopN(7, Rank())
    for i, v in enumerate(values):
        keep.add(Row(str(i), [], "", v, "", None, None))
    finite = [(v, i) for i, v in enumerate(values) if v is not None and not math.isnan(v)]
    expect = [str(i) for v, i in sorted(finite, key=lambda t: (-t[0], t[1]))[:7]]
    assert [r.mutant for r in keep.result()] == expect and len(keep.heap) == 7


def test_members_that_do_not_align_are_refused(tmp_path):
    from runner.errors import ExperimentFailed
    from runner.run.ensemble import Rank, merge

    a = member_dir(
        tmp_path, "a", result_csv([["H5A", "M", 1.0, None, None, None], ["Q4K", "M", 1.0, None, None, None]])
    )
    b = member_dir(
        tmp_path, "b", result_csv([["H5A", "M", 1.0, None, None, None], ["Q4R", "M", 1.0, None, None, None]])
    )
    c = member_dir(tmp_path, "c", result_csv([["H5A", "M", 1.0, None, None, None]]))
    with pytest.raises(ExperimentFailed, match="row 2 is 'Q4K' in e1 but 'Q4R' in e2"):
        list(merge([rows_of(a), rows_of(b)], ["e1", "e2"], Rank()))
    with pytest.raises(ExperimentFailed, match="e3 has 1 rows, others more"):
        list(merge([rows_of(a), rows_of(c)], ["e1", "e3"], Rank()))


def test_merged_output_has_the_ensemble_columns_in_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from runner.run.predict import write_output
    from runner.run.predict_io import Layout

    rows = merged(tmp_path, "ucb:0.5")
    layout = Layout(("id",), ensemble=True, ucb=True)
    written, shown = write_output(iter(rows), layout, "csv", tmp_path / "e.csv", tmp_path, None, 2)
    assert written == 5 and [r.mutant for r in shown] == ["H5A", "Q4K"]
    got = list(csv.reader((tmp_path / "e.csv").open(newline="")))
    assert got[0] == ["mutant", "id", "sequence", "prediction", "std", "n", "ucb", "error", "measured", "in_train"]
    assert got[1][:1] == ["H5A"] and got[1][5:] == ["3", repr(2.0 + 0.5 * rows[0].std), "", "true", "0"]
    assert got[3][3:] == ["", "", "0", "", "wild-type residue does not match", "", ""]
    write_output(iter(rows), layout, "parquet", tmp_path / "e.parquet", tmp_path, None, 0)
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.schema.field("n").type == pa.int64() and table.schema.field("in_train").type == pa.int64()
    assert table.column("std").to_pylist()[0] == pytest.approx(rows[0].std)


def test_stdout_gets_the_file_only_once_every_row_passed(tmp_path):
    from runner.errors import ExperimentFailed
    from runner.run.predict import write_output
    from runner.run.predict_io import Layout

    good = rows_of(member_dir(tmp_path, "a", result_csv([["H5A", "M", 1.0, None, None, None]])))
    sink = io.BytesIO()
    assert write_output(good, Layout(), "csv", None, tmp_path, sink, 0)[0] == 1
    assert sink.getvalue().decode().splitlines()[1] == '"H5A","M",1.0,"",,'
    bad = rows_of(member_dir(tmp_path, "b", result_csv([["H5A", "M", 1.0, None, None, None]]) + b'"X",,"no",,,\n'))
    sink = io.BytesIO()
    with pytest.raises(ExperimentFailed, match="prediction is not a number"):
        write_output(bad, Layout(), "csv", None, tmp_path, sink, 0)
    assert sink.getvalue() == b"" and [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# --- the table ----------------------------------------------------------------------------------------


def test_the_table_shows_spread_and_flags_and_sequences_only_when_asked(tmp_path):
    from runner.cli.predict import table_cells
    from runner.run.predict import Predicted
    from runner.run.predict_io import Layout

    rows = merged(tmp_path)
    result = Predicted({"members": [{}, {}, {}]}, Layout(("id",), ensemble=True), rows[:2])
    headers, body = table_cells(result, sequences=False)
    assert headers == ["mutant", "id", "prediction", "std", "n", "measured", "in_train"]
    assert body[0] == ["H5A", "id0", "2.0000", "1.0000", "3", "yes", "0/3"]
    headers, body = table_cells(result, sequences=True)
    assert headers[2] == "sequence" and body[0][2] == "MSIQA"


# --- the request ----------------------------------------------------------------------------------------


def split(*args, saturation=False, study=False):
    from runner.cli.predict import _split_positionals

    return _split_positionals(list(args), saturation, study)


def test_the_last_positional_is_input_unless_saturation(tmp_path):
    from runner.errors import UsageError

    assert split("e1", "in.csv") == (["e1"], Path("in.csv"))
    assert split("e1", "e2", "e3", "in.csv") == (["e1", "e2", "e3"], Path("in.csv"))
    assert split("e1") == (["e1"], None)  # the request then says INPUT or --saturation
    assert split("in.csv", study=True) == ([], Path("in.csv"))
    assert split("e1", "e2", saturation=True) == (["e1", "e2"], None)
    (tmp_path / "in.csv").write_text("mutant\n")
    with pytest.raises(UsageError, match="not both"):
        split("e1", str(tmp_path / "in.csv"), saturation=True)
    with pytest.raises(UsageError, match="give experiment ids or --study, not both"):
        split("e1", "in.csv", study=True)


def fake_experiment(work: Path, eid: str, plan: dict, template: str = TEMPLATE) -> None:
    """A succeeded experiment's files as `infra compare` and the member checks read them."""
    from runner.run.records import Experiment, new_record, plan_sha256

    exp = Experiment(work / "experiments" / eid)
    exp.make_layout()
    record = new_record(exp, name="blat", backend="local", plan_sha=plan_sha256(plan), attempt=1, previous=None)
    record.update(state="succeeded", plan_sha256=plan_sha256(plan))
    exp.write(record)
    (exp.root / "config" / "plan.json").write_text(json.dumps(plan))
    (exp.root / "ckpts" / "best.ckpt").write_bytes(b"weights")
    state = {"format": 1, "seq_len": len(template), "sources": [{"name": "s", "template": template}]}
    (exp.root / "config" / "predict.json").write_text(json.dumps(state))


def plan(seed: int, lr: float = 1e-3) -> dict:
    return {"name": "blat", "data": {"db": "x.db"}, "model": {"name": "linear"}, "train": {"seed": seed, "lr": lr}}


@pytest.fixture
def study_work(tmp_path) -> Path:
    work = tmp_path / "w"
    points = []
    for i, (seed, lr) in enumerate([(1, 1e-3), (2, 1e-3), (1, 1e-2)]):
        eid = f"blat-s{seed}-{i:010x}"
        fake_experiment(work, eid, plan(seed, lr))
        points.append({"index": i + 1, "values": {"train.seed": seed, "train.lr": lr}, "experiment_id": eid})
    (work / "studies").mkdir()
    doc = {"study_id": "blat-study-00000000aa", "name": "blat", "keys": ["train.seed", "train.lr"], "points": points}
    (work / "studies" / "blat-study-00000000aa.json").write_text(json.dumps(doc))
    (tmp_path / "in.csv").write_text("mutant\nH5A\n")
    return work


def test_a_study_whose_points_differ_in_more_than_seeds_is_refused(study_work):
    from runner.run.ensemble import study_members

    inp = str(study_work.parent / "in.csv")
    r = cli("predict", "--study", "blat-study", inp, workdir=study_work)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "points differ in train.lr, not only in seeds and folds" in r.stderr and "--where train.lr=VALUE" in r.stderr
    members = study_members(study_work, "blat-study-00000000aa", ["train.lr=0.001"])
    assert members == ["blat-s1-0000000000", "blat-s2-0000000001"]


def test_members_with_other_templates_are_refused_before_anything_runs(study_work, tmp_path):
    other = "blat-other-00000000ff"
    fake_experiment(study_work, other, plan(3), template="A" + TEMPLATE[1:])
    inp = str(study_work.parent / "in.csv")
    r = cli("predict", "blat-s1-0000000000", other, inp, "--backend", "local", workdir=study_work, cwd=tmp_path)
    assert r.returncode == 2 and f"experiment {other} was trained on other templates" in r.stderr, r.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("predictions-", ".infra-predict-"))]


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["blat-s1-0000000000", "IN", "--rank", "ucb:1"], "--rank ucb:1: one model has no spread"),
        (["blat-s1-0000000000", "blat-s2-0000000001", "IN", "--rank", "ucb:-1"], "--rank 'ucb:-1': use 'mean' or"),
        (["blat-s1-0000000000", "IN", "--json", "--out", "-"], "--json and --out - both write stdout"),
        (["blat-s1-0000000000", "IN", "--where", "train.seed=1"], "--where chooses among a study's points"),
    ],
    ids=["ucb-one-model", "ucb-negative", "json-stdout", "where-without-study"],
)
def test_bad_ensemble_requests_are_usage_errors(study_work, args, why):
    inp = str(study_work.parent / "in.csv")
    r = cli("predict", *[inp if a == "IN" else a for a in args], workdir=study_work)
    assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists(study_work / "-")


# --- the whole host path against a scripted core (what a hostile core can leave) ------------------------


class ScriptedCore:
    """The backend for `infra predict`'s members in these tests: instead of running the core it leaves
    the given result bytes and summary in the job's output folder, exactly what a core (an honest one,
    or plugin code in the container) can leave there. Everything else is the host's real path."""

    name = "local"

    def __init__(self, result: bytes, summary: dict):
        self.result, self.summary = result, summary

    def experiment_image(self, record):
        return None, None

    def predicts_members_together(self, image):
        return False  # one scripted result per run

    def run_once(self, job):
        from runner.run.backends import CoreOutput

        args = list(job.args)
        args[args.index("--out") + 1].host.write_bytes(self.result)
        args[args.index("--summary") + 1].host.write_text(json.dumps(self.summary))
        return CoreOutput(0, b"", "")


def honest_rows(mutants: list[str], measured: bool = False) -> list[list]:
    """The result rows an honest core gives for these input rows: mutant, id, sequence, prediction
    (the row's number), no error, with `measured` the first row measured (else the flag empty),
    in_train empty."""
    return [[m, f"v{i}", TEMPLATE, float(i), None, (i == 0) if measured else None, None] for i, m in enumerate(mutants)]


def summary_for(rows: list[list], k: int = 1, **override) -> dict:
    predicted = sum(r[k + 2] is not None for r in rows)
    errors = len(rows) - predicted
    doc = {"rows": len(rows), "predicted": predicted, "errors": errors,
           "errors_by_reason": {"mismatch": errors} if errors else {}, "measured": None, "in_train": None}  # fmt: skip
    return {**doc, **override}


INPUT_MUTANTS = ["H5A", "Q4K", "F6L", "M1A"]


@pytest.fixture
def one(tmp_path) -> tuple[Path, str, Path]:
    """(workdir, experiment id, INPUT): one succeeded experiment, an input of ids and mutants."""
    work = tmp_path / "w"
    eid = "blat-one-0000000001"
    fake_experiment(work, eid, plan(1))
    inp = tmp_path / "in.csv"
    inp.write_text("mutant,id\n" + "".join(f"{m},v{i}\n" for i, m in enumerate(INPUT_MUTANTS)))
    return work, eid, inp


def scripted(monkeypatch, result: bytes, summary: dict) -> None:
    """Every member of the next `infra predict` is played by ScriptedCore (the CLI picks each member's
    backend with runner.run.backends.backend_of)."""
    import runner.run.backends

    monkeypatch.setattr(runner.run.backends, "backend_of", lambda record: ScriptedCore(result, summary))


def test_an_honest_result_is_delivered_with_the_hosts_own_counts_and_top(one, monkeypatch, tmp_path):
    work, eid, inp = one
    rows = honest_rows(INPUT_MUTANTS)
    scripted(monkeypatch, result_csv(rows, ("id",)), summary_for(rows))
    out = tmp_path / "p.csv"
    r = cli("predict", eid, str(inp), "--out", str(out), "--top", "2", "--json", workdir=work)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (doc["rows"], doc["predicted"], doc["errors"], doc["written"]) == (4, 4, 0, 2)
    # --top is the host's for one model too: the best two of every row, best first
    assert [row[0] for row in csv.reader(out.open(newline=""))][1:] == ["M1A", "F6L"]


def test_measured_without_in_train_is_told_on_its_own(one, monkeypatch, tmp_path):
    # the experiment has data/selected.parquet (measured) but no splits/train.npy (in_train): the
    # core says measured 1 and in_train null; the old summary line formatted None and raised a
    # traceback after the file was written
    work, eid, inp = one
    (work / "experiments" / eid / "data").mkdir(exist_ok=True)
    (work / "experiments" / eid / "data" / "selected.parquet").write_bytes(b"PAR1")
    rows = honest_rows(INPUT_MUTANTS, measured=True)
    scripted(monkeypatch, result_csv(rows, ("id",)), summary_for(rows, measured=1))
    r = cli("predict", eid, str(inp), "--out", str(tmp_path / "p.csv"), workdir=work)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "predicted 4 of 4 rows; 1 measured; wrote 4 rows" in r.stderr
    from runner.cli.predict import _summary_line

    line = _summary_line({"errors_by_reason": {}, "predicted": 1, "rows": 1, "errors": 0, "measured": None,
                          "in_train": 2, "written": 1, "out": "x", "seconds": 0.1}, False)  # fmt: skip
    assert "; 2 in training; wrote" in line


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ("id", "changed INPUT: data row 2's input columns differ from INPUT's row 2"),
        ("order", "changed INPUT: data row 1's mutant differ"),
        ("drop", "has fewer rows (3) than INPUT"),
        ("add", "has more rows than INPUT (4)"),
        ("long-sequence", "its sequence has 61 residues, more than the template's 60"),
    ],
)
def test_a_result_that_rewrites_the_users_rows_is_refused(one, monkeypatch, tmp_path, change, why):
    work, eid, inp = one
    rows = honest_rows(INPUT_MUTANTS)
    if change == "id":
        rows[1][1] = '=HYPERLINK("http://x/")'  # the user's id column rewritten by the container
    elif change == "order":
        rows[0], rows[1] = rows[1], rows[0]
    elif change == "drop":
        rows.pop()
    elif change == "add":
        rows.append(["A2C", "v9", TEMPLATE, 9.0, None, False, None])
    else:
        rows[0][2] = TEMPLATE + "A"
    scripted(monkeypatch, result_csv(rows, ("id",)), summary_for(rows))
    out = tmp_path / "p.csv"
    r = cli("predict", eid, str(inp), "--out", str(out), workdir=work)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"prediction with {eid} left a result that" in r.stderr and why in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".infra-predict-*"))


def test_a_saturation_result_must_be_the_templates_single_substitutions(one, monkeypatch, tmp_path):
    work, eid, _ = one
    good = [[f"{TEMPLATE[0]}1{a}", TEMPLATE, 0.1, None, None, None] for a in "ACD"]
    scripted(monkeypatch, result_csv(good), summary_for(good, k=0))
    r = cli("predict", eid, "--saturation", "--out", str(tmp_path / "s.csv"), workdir=work)
    assert r.returncode == 0, r.stderr
    for bad in (["Q1A"], ["M1A", "M1A"], ["M2A"], ["I3A", "M1A"], ["M01A"], ["M1A:I3A"]):
        rows = [[m, TEMPLATE, 0.1, None, None, None] for m in bad]
        scripted(monkeypatch, result_csv(rows), summary_for(rows, k=0))
        r = cli("predict", eid, "--saturation", "--out", str(tmp_path / "bad.csv"), workdir=work)
        assert r.returncode == 1 and "is not this saturation's table" in r.stderr, (bad, r.stderr)
        assert not (tmp_path / "bad.csv").exists()


@pytest.mark.parametrize("out", ["file", "-"])
def test_a_summary_that_disagrees_with_the_rows_is_refused_before_anything_is_written(
    one, monkeypatch, tmp_path, capfd, out
):
    # every row has an error, the summary claims them predicted: the old code believed the summary
    work, eid, inp = one
    rows = [[m, f"v{i}", None, None, "wild-type residue does not match", None, None]
            for i, m in enumerate(INPUT_MUTANTS)]  # fmt: skip
    scripted(monkeypatch, result_csv(rows, ("id",)), summary_for(rows, predicted=4, errors=0, errors_by_reason={}))
    target = tmp_path / "p.csv"
    r = cli("predict", eid, str(inp), "--out", str(target) if out == "file" else "-", workdir=work)
    assert r.returncode == 1 and "has 4 rows (0 predicted) where its summary says 4 (4 predicted)" in r.stderr
    assert "nothing was written" in r.stderr and not target.exists() and r.stdout == ""
    # the honest summary of the same rows: none predicted is exit 2, the file written with the reasons
    scripted(monkeypatch, result_csv(rows, ("id",)), summary_for(rows))
    r = cli("predict", eid, str(inp), "--out", str(target), "--json", workdir=work)
    assert r.returncode == 2 and "none of the 4 rows could be predicted" in r.stderr and target.exists()


def test_a_flag_where_the_experiment_cannot_tell_it_is_refused(one, monkeypatch, tmp_path):
    work, eid, inp = one  # no data/selected.parquet: the core was given nothing to tell measured from
    rows = honest_rows(INPUT_MUTANTS, measured=True)
    scripted(monkeypatch, result_csv(rows, ("id",)), summary_for(rows))
    r = cli("predict", eid, str(inp), "--out", str(tmp_path / "p.csv"), workdir=work)
    assert r.returncode == 1 and "says measured on rows though the experiment lacks the files" in r.stderr


def test_a_result_cell_longer_than_the_request_can_give_is_refused(one, monkeypatch, tmp_path):
    # the old reader took any cell up to the whole size bound (sys.maxsize field limit); now a cell is
    # at most the longest INPUT cell or template plus FIELD_SLACK
    from runner.run.predict_io import FIELD_SLACK

    work, eid, inp = one
    rows = honest_rows(INPUT_MUTANTS)
    rows[2][4] = "x" * (FIELD_SLACK + 100)
    rows[2][3] = None
    scripted(monkeypatch, result_csv(rows, ("id",)), summary_for(rows))
    before = csv.field_size_limit()
    r = cli("predict", eid, str(inp), "--out", str(tmp_path / "p.csv"), workdir=work)
    assert r.returncode == 1 and "is not a UTF-8 CSV of infra's (Error near data row 2: field larger" in r.stderr
    assert csv.field_size_limit() == before


def test_reading_interleaved_results_leaves_the_csv_field_limit_alone(tmp_path):
    # two members' generators, advanced in turn and one abandoned: the old read_result saved and
    # restored the process-wide limit inside each generator and left it at sys.maxsize
    before = csv.field_size_limit()
    folders = members(tmp_path, PREDICTIONS[:2])
    a, b = (rows_of(f, ("id",)) for f in folders)
    next(a), next(b), next(a)
    list(a)  # the first one started ends first
    list(b)
    assert csv.field_size_limit() == before


def test_inf_and_nan_predictions_are_not_infras_table(tmp_path):
    from runner.errors import ExperimentFailed

    for i, text in enumerate(("inf", "-inf", "nan", "1e999")):
        content = result_csv([["H5A", "M", 1.0, None, None, None]]) + f'"Q4K","M",{text},,,\n'.encode()
        with pytest.raises(ExperimentFailed, match=f"data row 2: the prediction '{text}' is not a finite number"):
            list(rows_of(member_dir(tmp_path, f"r{i}", content)))


def test_huge_member_predictions_merge_without_overflow(tmp_path):
    # each member's 1e308 is a finite float the reader accepts; the old fsum/**2 raised OverflowError
    # (a traceback) on the host
    from runner.run.ensemble import parse_rank, top_rows

    predictions = [[1e308, 1e200, 1.7e308, 1.0, 2.0], [1e308, -1e200, -1.7e308, 1.0, 2.0]]
    rows = merged(tmp_path, "ucb:1.0", predictions)
    assert (rows[0].prediction, rows[0].std) == (1e308, 0.0)
    assert rows[1].prediction == 0.0 and rows[1].std == pytest.approx(math.sqrt(2) * 1e200)
    assert rows[1].ucb == pytest.approx(math.sqrt(2) * 1e200)
    assert (rows[2].prediction, rows[2].std, rows[2].ucb, rows[2].n) == (0.0, None, None, 2)  # std past the range
    best, _ = top_rows(iter(rows), 5, parse_rank("ucb:1.0"))
    assert [r.mutant for r in best] == ["H5A", "Q4K", "F6L", "M1A"]  # the row with no finite ucb is not ranked
    from runner.run.predict import write_output
    from runner.run.predict_io import Layout

    write_output(iter(rows), Layout(("id",), True, True), "csv", tmp_path / "e.csv", tmp_path, None, 0)
    got = list(csv.reader((tmp_path / "e.csv").open(newline="")))
    assert got[3][3:7] == ["0.0", "", "2", ""]


def test_every_table_cell_is_cut_but_asked_for_sequences(tmp_path):
    from runner.cli.predict import CELL_MAX, ERROR_MAX, table_cells
    from runner.run.predict import Predicted
    from runner.run.predict_io import Layout, Row

    long = Row("A1C:" * 1000, ["n" * 5000], TEMPLATE, None, "e" * 5000, None, None)
    headers, body = table_cells(Predicted({}, Layout(("note",)), [long]), sequences=True)
    cells = dict(zip(headers, body[0], strict=True))
    assert len(cells["mutant"]) == len(cells["note"]) == CELL_MAX and cells["mutant"].endswith("…")
    assert len(cells["error"]) == ERROR_MAX and cells["sequence"] == TEMPLATE


def test_ucb_on_a_study_of_one_point_says_so(study_work):
    inp = str(study_work.parent / "in.csv")
    r = cli("predict", "--study", "blat-study", "--where", "train.lr=0.01", inp, "--rank", "ucb:1",
            workdir=study_work)  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "study blat-study-00000000aa has one succeeded point matching --where" in r.stderr


def test_a_prediction_state_whose_sources_are_not_objects_is_refused(study_work, tmp_path):
    # `sources: [{...}, 5]`: the old length check skipped the 5 and the ensemble's template check
    # then raised AttributeError (a traceback)
    for eid in ("blat-s1-0000000000", "blat-s2-0000000001"):
        path = study_work / "experiments" / eid / "config" / "predict.json"
        state = json.loads(path.read_text())
        path.write_text(json.dumps({**state, "sources": [*state["sources"], 5]}))
    inp = str(study_work.parent / "in.csv")
    r = cli("predict", "blat-s1-0000000000", "blat-s2-0000000001", inp, workdir=study_work, cwd=tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "config/predict.json is not what the training writes" in r.stderr


BROKEN_PIPE_DRIVER = """
import json, sys
import runner.run.backends
from tests.test_predict_output import ScriptedCore
result, summary = open(sys.argv[1], "rb").read(), json.load(open(sys.argv[2]))
runner.run.backends.backend_of = lambda record: ScriptedCore(result, summary)
from runner.cli import main
main(sys.argv[3:])
"""


def test_out_dash_into_a_closed_pipe_stops_quietly(one, tmp_path):
    import subprocess
    import sys

    from tests.helpers import REPO

    work, eid, _ = one
    # several of write_output's 1 MiB copies (one large write into a closed pipe can end without EPIPE)
    mutants = [f"{TEMPLATE[p % 60]}{p % 60 + 1}A" for p in range(40000)]
    inp = tmp_path / "big.csv"
    inp.write_text("mutant,id\n" + "".join(f"{m},v{i}\n" for i, m in enumerate(mutants)))
    rows = [[m, f"v{i}", TEMPLATE, float(i), None, None, None] for i, m in enumerate(mutants)]
    (tmp_path / "result.csv").write_bytes(result_csv(rows, ("id",)))
    (tmp_path / "summary.json").write_text(json.dumps(summary_for(rows)))
    (tmp_path / "driver.py").write_text(BROKEN_PIPE_DRIVER)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(scratch), "INFRA_WORKDIR": str(work)}
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "result.csv"), str(tmp_path / "summary.json"),
         "predict", eid, str(inp), "--out", "-", "--workdir", str(work)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env,
    )  # fmt: skip
    assert proc.stdout.read(100).startswith(b'"mutant","id"')  # `| head -c 100`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
    assert list(scratch.iterdir()) == []  # the scratch folder is removed


def test_members_share_a_run_only_when_their_images_core_can():
    """An ensemble's members of one backend, image, limits and model store share one core run, in the
    members' order; a member whose image's core predates shared runs (an older experiment) runs alone."""
    from types import SimpleNamespace

    from runner.run.jobs import Limits
    from runner.run.predict import share_a_start

    def member(image, together=True, limits=Limits(), backend="docker"):
        return SimpleNamespace(backend=SimpleNamespace(name=backend), image=(f"t{image}", f"i{image}"),
                               limits=limits, models=None, together=together)  # fmt: skip

    members = [member(1), member(2), member(1), member(1, limits=Limits(memory="1g")), member(2), member(1)]
    assert share_a_start(members) == [[0, 2, 5], [1, 4], [3]]
    old = [member(1, together=False), member(1, together=False), member(1)]
    assert share_a_start(old) == [[0], [1], [2]]
    assert share_a_start([member(1), member(1, backend="local")]) == [[0], [1]]
