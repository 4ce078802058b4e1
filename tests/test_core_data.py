"""load_variants on real SQLite files: the query, every where op, bad data, WAL, read-only folders."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runner.core.data import VariantSet, build_query, load_variants, sequences_from_tokens
from runner.core.vocab import get_vocab_processor
from runner.data.db import SCHEMA_SQL, DbLayout, read_layout
from runner.errors import DataError, PlanError
from runner.plan.issues import plan_from_document
from runner.plan.models import DataSpec, Plan

pytestmark = pytest.mark.core

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "MSIQHFRVALIPFFAAFCLPVFAHPETLVKVKDAEDQLGARVGYIELDLNSGKILESFRP"  # BLAT_ECOLX 1-60
SHORT = "MQYKLILNGKTLKGETTTEAVDAATAEKVFKQYANDNGVDGEWTYDDATKTFTVTE"  # GB1, 56 aa
ROWS = [  # mutant, DMS_score, DMS_score_bin, split
    ("H24A", -0.009783565, 1, "train"),
    ("H24C", -0.418259925, 1, "train"),
    ("P25A", -2.1, 0, "test"),
    ("E26K", 0.05, 1, "train"),
    ("H24A:P25G", -1.8, 0, "test"),
    ("", 0.0, 1, "train"),
    ("F6*", None, None, "train"),
    ("S2A", 0.1234567890123456789, 1, None),
]


def make_db(path: Path, rows=ROWS, sources=(("BLAT", TEMPLATE),), wal: bool = False, other_rows=()) -> Path:
    conn = sqlite3.connect(path)
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA_SQL)
    conn.execute("ALTER TABLE mutations ADD COLUMN split TEXT")
    for name, template in sources:
        conn.execute("INSERT INTO sources (source_text, template) VALUES (?, ?)", (name, template))
    conn.executemany(
        "INSERT INTO mutations (source, mutant, mut_num, DMS_score, DMS_score_bin, split) VALUES (1, ?, ?, ?, ?, ?)",
        [(m, len(list(filter(None, m.split(":")))), s, b, sp) for m, s, b, sp in rows],
    )
    conn.executemany(
        "INSERT INTO mutations (source, mutant, mut_num, DMS_score, DMS_score_bin, split) VALUES (2, ?, 1, ?, 1, 'x')",
        other_rows,
    )
    conn.commit()
    conn.close()
    return path


def layout_of(db: Path) -> DbLayout:
    with sqlite3.connect(db) as conn:
        return read_layout(conn)


def plan(db: Path, **data) -> Plan:
    doc = {"name": "t", "data": {"db": str(db), **data}, "model": {"name": "linear"}, "vocab": {"name": "IUPAC"}}
    return plan_from_document(doc, "plan")  # as the core reads config/plan.json


def load(db: Path, aggregate_read: bool = True, **data) -> VariantSet:
    """load_variants of the plan with these `data.*` keys, as the training core calls it."""
    typed = plan(db, **data)
    return load_variants(typed.data, typed.vocab, aggregate_read=aggregate_read)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def db(tmp_path) -> Path:
    return make_db(tmp_path / "dms.sqlite")


def test_loads_tokens_targets_and_frame(db):
    vs = load(db)
    assert len(vs) == 7 and vs.dropped == {"nan_target": 1}
    assert vs.ids.tolist() == [1, 2, 3, 4, 5, 6, 8]
    assert vs.tokens.dtype == np.uint8 and vs.tokens.shape == (7, len(TEMPLATE))
    assert vs.target.dtype == np.float32 and vs.target[0] == np.float32(-0.009783565)
    assert vs.mut_num.tolist() == [1, 1, 1, 1, 2, 0, 1] and vs.first_pos.tolist() == [24, 24, 25, 26, 24, 0, 2]
    assert vs.source_names == ["BLAT"] and vs.templates == [TEMPLATE] and vs.lengths.tolist() == [60] * 7
    frame = vs.frame
    assert list(frame.columns) == [
        "id",
        "source_text",
        "mutant",
        "mut_num",
        "DMS_score",
        "DMS_score_bin",
        "split",
        "sequence",
    ]
    assert frame["sequence"].iloc[4] == TEMPLATE[:23] + "AG" + TEMPLATE[25:]
    assert frame["sequence"].iloc[5] == TEMPLATE and frame["mutant"].iloc[5] == ""
    assert frame["DMS_score"].iloc[6] == 0.1234567890123456789  # 17 significant digits survive the read
    assert frame["split"].tolist()[:3] == ["train", "train", "test"]
    assert vs.vocab.decode(vs.tokens) == frame["sequence"].tolist()
    assert vs.extra_columns == ["split"]
    json.dumps(vs.query)  # goes to config/query.json as is
    assert vs.query["sql"].endswith("ORDER BY m.id") and vs.query["params"] == []


def test_arrow_aggregate_and_row_reads_agree(db, monkeypatch):
    import runner.core.data as data_module

    arrow = data_module._read_columns_arrow(
        db,
        *data_module.build_query(plan(db).data, layout_of(db))[:2],
        ["split"],
    )
    assert arrow is not None, "the ADBC reader (adbc-driver-sqlite, a core dependency) should handle this selection"
    fast = load(db)
    slow = load(db, aggregate_read=False)
    monkeypatch.setattr(data_module, "_read_columns_arrow", lambda *a: None)
    aggregate = load(db)
    for other in (slow, aggregate):
        assert np.array_equal(fast.tokens, other.tokens) and np.array_equal(fast.target, other.target, equal_nan=True)
        assert fast.frame.astype(str).equals(other.frame.astype(str))


def _big_db(path: Path, n: int = 3000, int_scores_first: bool = False) -> Path:
    """n single mutants of TEMPLATE; with int_scores_first the first half's scores are integers."""
    rng = np.random.default_rng(1)
    pos = rng.integers(2, len(TEMPLATE) + 1, n)
    rows = []
    for i, p in enumerate(pos.tolist()):
        wt = TEMPLATE[p - 1]
        mt = "A" if wt != "A" else "G"
        score = int(i % 7) if int_scores_first and i < n // 2 else float(rng.normal())
        rows.append((f"{wt}{p}{mt}", score, int(i % 2), "train"))
    return make_db(path, rows=rows)


@pytest.mark.parametrize("int_scores_first", [False, True])
def test_parallel_id_range_read_matches_one_reader(tmp_path, monkeypatch, int_scores_first):
    import runner.core.data as data_module

    db = _big_db(tmp_path / "big.sqlite", int_scores_first=int_scores_first)
    monkeypatch.setattr(data_module, "PARALLEL_READ_MIN_IDS", 1)
    monkeypatch.setattr(data_module.os, "sched_getaffinity", lambda pid: {0, 1})
    with sqlite3.connect(db) as conn:
        parts = data_module.read_parts(conn, plan(db).data, read_layout(conn))
        assert data_module.read_parts(conn, plan(db, limit=10).data) is None  # LIMIT: one ordered read
    assert parts == [(1, 1501), (1501, 3001)]
    sql, params, extras = build_query(plan(db).data, layout_of(db))
    assert data_module._read_columns_arrow(db, sql, params, extras, parts) is not None
    parallel = load(db)
    monkeypatch.setattr(data_module, "_read_columns_arrow", lambda *a: None)
    single = load(db)
    assert len(parallel) == 3000 and np.array_equal(parallel.ids, single.ids)
    assert np.array_equal(parallel.tokens, single.tokens) and np.array_equal(parallel.target, single.target)
    assert parallel.frame.astype(str).equals(single.frame.astype(str))


def test_parallel_read_with_empty_parts_and_a_changing_file(tmp_path, monkeypatch):
    import runner.core.data as data_module

    db = _big_db(tmp_path / "big.sqlite")
    monkeypatch.setattr(data_module, "PARALLEL_READ_MIN_IDS", 1)
    monkeypatch.setattr(data_module.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    # only the first ids match: the later parts come back empty and are left out of the join
    vs = load(db, where=[{"column": "id", "op": "<=", "value": 100}])
    assert vs.ids.tolist() == list(range(1, 101))
    # a write between the parts' reads: the parallel result is discarded for one consistent read
    signatures = iter([("before",), ("after",)])
    monkeypatch.setattr(data_module, "_db_signature", lambda path: next(signatures))
    sql, params, extras = build_query(plan(db).data, layout_of(db))
    assert data_module._read_columns_arrow(db, sql, params, extras, [(1, 1500), (1500, 3001)]) is None


def test_stop_codon_row_and_keep_nan(db):
    vs = load(db, drop_nan=False)
    assert len(vs) == 8 and vs.dropped == {} and np.isnan(vs.target[6])
    assert vs.frame["sequence"].iloc[6] == TEMPLATE[:5] + "*" + TEMPLATE[6:]


def test_classification_target(db):
    vs = load(db, target="DMS_score_bin")
    assert vs.target.tolist() == [1, 1, 0, 1, 0, 1, 1] and vs.target_name == "DMS_score_bin"


@pytest.mark.parametrize(
    ("clause", "ids"),
    [
        ({"column": "DMS_score", "op": "<", "value": -1}, [3, 5]),
        ({"column": "DMS_score", "op": "<=", "value": -1.8}, [3, 5]),
        ({"column": "DMS_score", "op": ">", "value": 0}, [4, 8]),
        ({"column": "DMS_score", "op": ">=", "value": 0.05}, [4, 8]),
        ({"column": "mut_num", "op": "=", "value": 2}, [5]),
        ({"column": "mut_num", "op": "!=", "value": 1}, [5, 6]),
        ({"column": "mutant", "op": "in", "value": ["H24A", "E26K"]}, [1, 4]),
        ({"column": "mutant", "op": "not_in", "value": ["H24A", "E26K"]}, [2, 3, 5, 6, 8]),
        ({"column": "mutant", "op": "like", "value": "H24%"}, [1, 2, 5]),
        ({"column": "DMS_score", "op": "between", "value": [-2, -1]}, [5]),
        ({"column": "split", "op": "is_null"}, [8]),
        ({"column": "split", "op": "not_null"}, [1, 2, 3, 4, 5, 6]),
        ({"column": "source_text", "op": "=", "value": "BLAT"}, [1, 2, 3, 4, 5, 6, 8]),
    ],
)
def test_where_ops(db, clause, ids):
    vs = load(db, where=[clause])
    assert vs.ids.tolist() == ids
    assert "?" in vs.query["sql"] or clause["op"] in ("is_null", "not_null")


def test_limit_and_combined_filters(db):
    vs = load(db, where=[{"column": "split", "op": "=", "value": "train"}], limit=3)
    assert vs.ids.tolist() == [1, 2, 4]
    assert vs.query["params"] == ["train", 3]


@pytest.mark.parametrize(
    ("clause", "message"),
    [
        (
            {"column": "nope", "op": "=", "value": 1},
            r"data\.where\[0\]\.column: unknown column 'nope'; the database has: id, ",
        ),
        (
            {"column": "mutant_", "op": "=", "value": 1},
            r"data\.where\[0\]\.column: unknown column 'mutant_'",
        ),
    ],
)
def test_unknown_where_columns(db, clause, message):
    # what needs the database is checked where the database is read
    before = sha256(db)
    with pytest.raises(DataError, match=message):
        load(db, where=[clause])
    assert sha256(db) == before


@pytest.mark.parametrize(
    ("clause", "message"),
    [
        ({"column": "mutant", "op": "in", "value": "H24A"}, "must be a non-empty list of scalars for op 'in'"),
        ({"column": "mutant", "op": "in", "value": []}, "must be a non-empty list of scalars for op 'in'"),
        ({"column": "DMS_score", "op": "between", "value": [1]}, "must be [low, high] for op 'between'"),
        ({"column": "DMS_score", "op": "<", "value": [1, 2]}, "must be a string, number or boolean for op '<'"),
        ({"column": "DMS_score", "op": "="}, "must be a string, number or boolean for op '='"),
        ({"column": "split", "op": "is_null", "value": 1}, "must be absent for op 'is_null'"),
        ({"column": "mutant", "op": "like", "value": 3}, "must be a string pattern for op 'like'"),
        ({"column": "DMS_score", "op": ">", "value": float("nan")}, "numbers must be finite"),
        ({"column": "id", "op": ">", "value": 2**63}, "integers must lie within ±9223372036854775807 (SQLite's range)"),
    ],
)
def test_where_values_of_the_wrong_shape_never_reach_the_core(db, clause, message):
    # the plan model refuses them (the one rule of runner.plan.models.WhereClause), before any query
    with pytest.raises(PlanError) as info:
        plan(db, where=[{"column": "mut_num", "op": ">=", "value": 0}, clause])
    assert [str(i) for i in info.value.issues] == [f"data.where[1].value: {message}"]


def test_sql_injection_in_a_column_name_is_refused_by_the_plan(db):
    with pytest.raises(PlanError, match=r"data\.where\[0\]\.column: .* is not allowed: must be a column name"):
        plan(db, where=[{"column": 'mutant" = mutant; DROP TABLE sources; --', "op": "=", "value": 1}])


def test_injection_in_values_is_bound_not_executed(db):
    before = sha256(db)
    for value in ["x' OR '1'='1", "H24A'; DROP TABLE mutations; --", "%' OR 1=1 --"]:
        with pytest.raises(DataError, match="the selection is empty"):
            load(db, where=[{"column": "mutant", "op": "=", "value": value}])
    vs = load(db, where=[{"column": "mutant", "op": "in", "value": ["H24A", "x') OR ('1'='1"]}])
    assert vs.ids.tolist() == [1]
    assert "x') OR ('1'='1" in vs.query["params"] and "OR ('1'" not in vs.query["sql"]
    assert sha256(db) == before
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM mutations").fetchone()[0] == len(ROWS)
    conn.close()


def test_build_query_quotes_only_known_columns():
    layout = DbLayout(
        ("id", "mutant", "DMS_score", "DMS_score_bin", "mut_num", "source", "split"),
        ("id", "source_text", "template"),
        "source",
        True,
    )
    data = DataSpec(db="x.sqlite", where=[{"column": "split", "op": "=", "value": "a"}], dataset=["A", "B"], limit=5)
    sql, params, extras = build_query(data, layout)
    assert (
        'm."source" IN (SELECT id FROM sources WHERE source_text IN (?, ?))' in sql
        and 'm."split" = ?' in sql
        and sql.endswith("ORDER BY m.id LIMIT ?")
    )
    assert params == ["A", "B", "a", 5] and extras == ["split"]


def test_empty_selection_message(db):
    with pytest.raises(
        DataError,
        match=r"data: the selection is empty: where\[0\]=DMS_score > 100 matched no rows in .*check data.dataset / data.where",
    ):
        load(db, where=[{"column": "DMS_score", "op": ">", "value": 100}])
    with pytest.raises(DataError, match="has a NULL/NaN or infinite DMS_score"):
        load(db, where=[{"column": "mutant", "op": "=", "value": "F6*"}])


def test_datasets_of_different_lengths_pad(tmp_path):
    db = make_db(
        tmp_path / "two.sqlite",
        sources=(("BLAT", TEMPLATE), ("GB1", SHORT)),
        other_rows=[("V39A", 0.5), ("D40C:V54G", 0.7)],
    )
    vs = load(db)
    assert vs.source_names == ["BLAT", "GB1"] and vs.tokens.shape == (9, 60)
    assert vs.lengths.tolist()[-2:] == [56, 56] and vs.tokens[-1, 56:].tolist() == [0, 0, 0, 0]
    assert vs.frame["sequence"].iloc[-1] == SHORT[:39] + "C" + SHORT[40:53] + "G" + SHORT[54:]
    assert vs.frame["source_text"].tolist()[-2:] == ["GB1", "GB1"]
    only = load(db, dataset="GB1")
    assert only.tokens.shape == (2, 56) and only.query["params"] == ["GB1"]
    assert only.source.tolist() == [0, 0] and only.source_names == ["GB1"]
    with pytest.raises(DataError, match=r"data.dataset: 'nope' not in .*sources there: BLAT, GB1"):
        load(db, dataset=["GB1", "nope"])


def test_mismatch_error_and_drop(tmp_path):
    rows = [*ROWS, ("Q2A", 1.0, 1, "train"), ("S99A", 1.0, 1, "train"), ("S2", 1.0, 1, "train")]
    db = make_db(tmp_path / "bad.sqlite", rows=rows)
    with pytest.raises(DataError, match=r"row id 9 \(mutant 'Q2A', source 'BLAT'\): wild type 'Q' at position 2"):
        load(db)
    with pytest.raises(DataError, match=r"row id 10 \(mutant 'S99A'.*position 99 is outside the template"):
        load(db, where=[{"column": "id", "op": ">", "value": 9}])
    with pytest.raises(DataError, match=r"row id 11 \(mutant 'S2'.*not of the form"):
        load(db, where=[{"column": "id", "op": ">", "value": 10}])
    vs = load(db, on_mismatch="drop")
    assert len(vs) == 7
    assert vs.dropped == {"nan_target": 1, "malformed": 1, "out_of_range": 1, "mismatch": 1}


def test_orphan_rows_are_an_error(tmp_path):
    db = make_db(tmp_path / "orphan.sqlite", other_rows=[("V39A", 0.5)])  # source 2 does not exist
    with pytest.raises(DataError, match="row id 9 .* refers to source 2, which is not in sources"):
        load(db)


def test_sources_column_filter(tmp_path):
    db = make_db(tmp_path / "two.sqlite", sources=(("BLAT", TEMPLATE), ("GB1", SHORT)), other_rows=[("V39A", 0.5)])
    vs = load(db, where=[{"column": "template", "op": "like", "value": "MQY%"}])
    assert vs.ids.tolist() == [9] and 'SELECT id FROM sources WHERE "template" LIKE ?' in vs.query["sql"]


def test_bad_database_paths(tmp_path):
    with pytest.raises(DataError, match="data.db: .*does not exist"):
        load(tmp_path / "missing.sqlite")
    (tmp_path / "x.sqlite").write_text("not a db")
    with pytest.raises(DataError, match="not a SQLite database"):
        load(tmp_path / "x.sqlite")
    conn = sqlite3.connect(tmp_path / "empty.sqlite")
    conn.execute("CREATE TABLE other (x)")
    conn.close()
    with pytest.raises(DataError, match="has no 'sources' and no 'mutations' table"):
        load(tmp_path / "empty.sqlite")


def test_wal_database_bytes_unchanged(tmp_path):
    db = make_db(tmp_path / "wal.sqlite", wal=True)
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    before = sha256(db)
    vs = load(db)
    assert len(vs) == 7
    assert sha256(db) == before


def _readonly_run(folder: Path, code: str) -> subprocess.CompletedProcess:
    """Run `code` with `folder` read-only: a read-only bind mount as root, chmod otherwise."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
        finally:
            folder.chmod(0o755)
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare: cannot make a read-only folder")
    script = f'mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && exec {sys.executable} -c "$0"'
    result = subprocess.run(["unshare", "-m", "sh", "-c", script, code], capture_output=True, text=True, cwd=REPO)
    if "mount" in result.stderr and result.returncode != 0 and "Traceback" not in result.stderr:
        pytest.skip(f"cannot bind-mount read-only here: {result.stderr.strip()}")
    return result


def test_wal_database_in_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    db = make_db(folder / "dms.sqlite", wal=True)
    before = sha256(db)
    code = (
        "from runner.core.data import load_variants\n"
        "from runner.plan.models import DataSpec\n"
        f"vs = load_variants(DataSpec(db={str(db)!r}))\n"
        "print(len(vs), vs.tokens.shape[1])\n"
        "try:\n"
        f"    open({str(folder / 'probe')!r}, 'w')\n"
        "    print('writable')\n"
        "except OSError:\n"
        "    print('read-only')\n"
    )
    result = _readonly_run(folder, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["7", "60", "read-only"]
    assert sha256(db) == before
    assert sorted(p.name for p in folder.iterdir()) == ["dms.sqlite"]


def test_sequences_from_tokens_handles_padding():
    vocab = get_vocab_processor("IUPAC")
    tokens = vocab.encode(["MKV", "M", "MK*"])
    assert sequences_from_tokens(tokens, vocab).tolist() == ["MKV", "M", "MK*"]
    assert sequences_from_tokens(tokens[:1], vocab, np.array([3])).tolist() == ["MKV"]


def test_demo_database_loads(tmp_path):
    from runner.data.importer import build_demo_db

    db = tmp_path / "demo.sqlite"
    build_demo_db(db)
    vs = load(db, dataset="BLAT_ECOLX_Stiffler_2015")
    assert vs.tokens.shape == (4997, 286) and vs.dropped == {}
    assert np.isfinite(vs.target).all() and set(vs.frame["DMS_score_bin"].unique()) == {0, 1}


@pytest.mark.parametrize("aggregate", [True, False])
def test_text_in_a_score_column_is_an_error(tmp_path, aggregate):
    db = make_db(tmp_path / "text.sqlite", rows=[("H24A", "high", 1, "train")])
    with pytest.raises(DataError, match="not a number"):
        load(db, aggregate_read=aggregate)
