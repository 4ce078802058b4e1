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
