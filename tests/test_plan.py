"""The plan contract: loading, dotted keys, overrides, and every kind of bad plan with its exact message."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import jsonschema
import pytest

from runner.errors import PlanError, UsageError
from runner.plan.document import expand_dotted
from runner.plan.load import load_plan
from runner.plan.schema import SCHEMA_PATH, plan_schema, render


def good(db: Path, **extra) -> dict:
    doc = {"name": "blat-linear", "data": {"db": str(db)}, "model": {"name": "linear"}}
    doc.update(extra)
    return doc


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def issues_of(doc, **kw) -> list[str]:
    with pytest.raises(PlanError) as info:
        load_plan("plan.json", text=doc if isinstance(doc, str) else json.dumps(doc), **kw)
    return [str(i) for i in info.value.issues]


def test_good_plan_fills_defaults(mini_db):
    loaded = load_plan("plan.json", text=json.dumps(good(mini_db)))
    resolved = loaded.resolved
    assert resolved["train"]["lr"] == 0.001
    assert resolved["embeddings"]["name"] == "onehot"
    assert resolved["vocab"]["name"] == "IUPAC"
    assert resolved["split"]["strategy"] == "random"
    assert resolved["data"]["db"] == str(mini_db.resolve())
    assert resolved["resources"]["network"] == "none"


def test_dotted_and_nested_are_equivalent(mini_db):
    nested = load_plan("p", text=json.dumps(good(mini_db, train={"lr": 0.01, "batch_size": 32}))).resolved
    dotted = load_plan("p", text=json.dumps(good(mini_db, **{"train.lr": 0.01, "train.batch_size": 32}))).resolved
    mixed = load_plan("p", text=json.dumps(good(mini_db, train={"lr": 0.01}, **{"train.batch_size": 32}))).resolved
    assert nested == dotted == mixed


def test_set_overrides_parse_json_else_string(mini_db):
    loaded = load_plan(
        "p",
        text=json.dumps(good(mini_db)),
        overrides=["train.lr=0.05", "model.params.hidden=[64, 32]", "name=other", "split.strategy=mut_num"],
    )
    assert loaded.plan.train.lr == 0.05
    assert loaded.plan.model.params == {"hidden": [64, 32]}
    assert loaded.plan.name == "other"
    assert loaded.plan.split.strategy == "mut_num"


def test_set_without_equals_is_usage_error(mini_db):
    with pytest.raises(UsageError, match=r"--set 'train.lr': expected KEY=VALUE"):
        load_plan("p", text=json.dumps(good(mini_db)), overrides=["train.lr"])


def test_params_keep_dotted_keys(mini_db):
    loaded = load_plan("p", text=json.dumps(good(mini_db, model={"name": "mlp", "params": {"a.b": 1}})))
    assert loaded.plan.model.params == {"a.b": 1}


def test_relative_db_resolves_against_plan_folder_then_workdir(tmp_path, mini_db):
    plan_dir = tmp_path / "plans"
    plan_dir.mkdir()
    (plan_dir / "p.json").write_text(json.dumps(good(Path("mini.db"))))
    # not beside the plan: falls back to the workdir (tmp_path holds mini.db)
    assert load_plan(str(plan_dir / "p.json"), workdir=tmp_path).plan.data.db == str(mini_db.resolve())
    # beside the plan wins
    from tests.conftest import make_db

    local = make_db(plan_dir / "mini.db")
    assert load_plan(str(plan_dir / "p.json"), workdir=tmp_path).plan.data.db == str(local.resolve())


def test_all_errors_reported_at_once(mini_db):
    found = issues_of(good(mini_db, train={"lr": -1, "batch_size": 0}, resources={"gpus": "some"}))
    assert found == [
        "train.lr: must be > 0",
        "train.batch_size: must be > 0",
        'resources.gpus: must be "all", "none", a GPU count or a device list like "0,2"',
    ]


BAD_PLANS = [
    # (id, plan (dict or raw text), exact messages)
    ("missing-name", lambda db: {"data": {"db": db}, "model": {"name": "linear"}}, ["name: required key is missing"]),
    (
        "missing-data-model",
        lambda db: {"name": "x"},
        ["data: required key is missing", "model: required key is missing"],
    ),
    ("name-wrong-type", lambda db: good(db, name=5), ["name: must be a string"]),
    (
        "name-uppercase",
        lambda db: good(db, name="BLAT"),
        [
            "name: 'BLAT' is not allowed: use 1-64 lowercase letters, digits, '.', '_' or '-' (starting with a letter or digit), and {plan.key} placeholders such as {model.name}"
        ],
    ),
    (
        "name-traversal",
        lambda db: good(db, name="../etc"),
        [
            "name: '../etc' is not allowed: use 1-64 lowercase letters, digits, '.', '_' or '-' (starting with a letter or digit), and {plan.key} placeholders such as {model.name}"
        ],
    ),
    (
        "name-slash",
        lambda db: good(db, name="a/b"),
        [
            "name: 'a/b' is not allowed: use 1-64 lowercase letters, digits, '.', '_' or '-' (starting with a letter or digit), and {plan.key} placeholders such as {model.name}"
        ],
    ),
    (
        "name-too-long",
        lambda db: good(db, name="a" * 65),
        [
            f"name: '{'a' * 65}' is not allowed: use 1-64 lowercase letters, digits, '.', '_' or '-' (starting with a letter or digit), and {{plan.key}} placeholders such as {{model.name}}"
        ],
    ),
    (
        "experiment-id-traversal",
        lambda db: good(db, experiment_id=".."),
        [
            "experiment_id: '..' is not allowed: use 1-64 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
        ],
    ),
    ("unknown-top-key", lambda db: good(db, modle={"name": "x"}), ["modle: unknown key; did you mean 'model'?"]),
    (
        "unknown-nested-key",
        lambda db: good(db, train={"lrate": 0.1}),
        [
            "train.lrate: unknown key; allowed: accelerator, batch_size, deterministic, devices, early_stopping_patience, gradient_clip_val, lr, max_epochs, optimizer, precision, seed, select_by, weight_decay"
        ],
    ),
    (
        "unknown-dotted-key",
        lambda db: good(db, **{"train.epochs": 3}),
        ["train.epochs: unknown key; did you mean 'max_epochs'?"],
    ),
    ("negative-lr", lambda db: good(db, train={"lr": -0.1}), ["train.lr: must be > 0"]),
    ("lr-string", lambda db: good(db, train={"lr": "fast"}), ["train.lr: must be a number"]),
    ("batch-float", lambda db: good(db, train={"batch_size": 3.5}), ["train.batch_size: must be an integer"]),
    ("empty-model", lambda db: good(db, model={}), ["model.name: required key is missing"]),
    (
        "empty-model-name",
        lambda db: good(db, model={"name": ""}),
        ["model.name: '' is not allowed: must be a registered name (letters, digits, '.', '_', '-'; 1-64 characters)"],
    ),
    ("model-not-object", lambda db: good(db, model="linear"), ["model: must be an object"]),
    (
        "bad-target",
        lambda db: good(db, data={"db": db, "target": "score"}),
        ["data.target: must be one of 'DMS_score' or 'DMS_score_bin'"],
    ),
    (
        "bad-split",
        lambda db: good(db, split={"strategy": "stratified"}),
        ["split.strategy: must be one of 'random', 'mut_num', 'modulo', 'contiguous' or 'column'"],
    ),
    (
        "fold-out-of-range",
        lambda db: good(db, split={"n_folds": 5, "fold": 5}),
        ["split.fold: must be < split.n_folds (5); folds count from 0"],
    ),
    (
        "fold-without-folds",
        lambda db: good(db, split={"fold": 1}),
        ["split.fold: needs split.n_folds (k-fold cross-validation)"],
    ),
    (
        "fractions-too-big",
        lambda db: good(db, split={"val_fraction": 0.5, "test_fraction": 0.5}),
        ["split.val_fraction: split.val_fraction + split.test_fraction must be < 1"],
    ),
    (
        "column-split-without-column",
        lambda db: good(db, split={"strategy": "column"}),
        ["split.column: required when split.strategy is 'column'"],
    ),
    (
        "bad-gpus",
        lambda db: good(db, resources={"gpus": "0,,1"}),
        ['resources.gpus: must be "all", "none", a GPU count or a device list like "0,2"'],
    ),
    (
        "bad-network",
        lambda db: good(db, resources={"network": "overlay"}),
        ["resources.network: must be one of 'none', 'bridge' or 'host'"],
    ),
    ("empty-metrics", lambda db: good(db, metrics=[]), ["metrics: must have at least 1 item(s)"]),
    (
        "where-bad-op",
        lambda db: good(db, data={"db": db, "where": [{"column": "mut_num", "op": "~", "value": 1}]}),
        [
            "data.where[0].op: must be one of '=', '!=', '<', '<=', '>', '>=', 'in', 'not_in', 'like', 'between', 'is_null' or 'not_null'"
        ],
    ),
    (
        "where-injection-column",
        lambda db: good(
            db, data={"db": db, "where": [{"column": "mut_num; DROP TABLE mutations", "op": "=", "value": 1}]}
        ),
        [
            "data.where[0].column: 'mut_num; DROP TABLE mutations' is not allowed: must be a column name (letters, digits, '_'; not starting with a digit)"
        ],
    ),
    (
        "where-unknown-column",
        lambda db: good(db, data={"db": db, "where": [{"column": "mutnum", "op": "=", "value": 1}]}),
        ["data.where[0].column: no column 'mutnum' in plan-db.sqlite; did you mean 'mut_num'?"],
    ),
    (
        "where-between-shape",
        lambda db: good(db, data={"db": db, "where": [{"column": "mut_num", "op": "between", "value": 1}]}),
        ["data.where[0].value: must be [low, high] for op 'between'"],
    ),
    (
        "where-in-empty",
        lambda db: good(db, data={"db": db, "where": [{"column": "mut_num", "op": "in", "value": []}]}),
        ["data.where[0].value: must be a non-empty list of scalars for op 'in'"],
    ),
    (
        "unknown-dataset",
        lambda db: good(db, data={"db": db, "dataset": "BLAT"}),
        ["data.dataset: no dataset 'BLAT' in plan-db.sqlite; did you mean 'BLAT_mini'?"],
    ),
    (
        "transform-on-classification",
        lambda db: good(db, data={"db": db, "target": "DMS_score_bin", "transform": "log"}),
        ["data.transform: applies to regression only; use 'none' with target DMS_score_bin"],
    ),
    (
        "missing-db",
        lambda db: good(db, data={"db": "/nonexistent/x.db"}),
        ["data.db: /nonexistent/x.db does not exist; create it with 'infra data import' or fix the path"],
    ),
    ("db-not-sqlite", lambda db: good(db, data={"db": "NOTSQLITE"}), ["data.db: NOTSQLITE is not a SQLite database"]),
    (
        "db-without-tables",
        lambda db: good(db, data={"db": "NO_TABLES"}),
        ["data.db: NO_TABLES has no 'sources' and no 'mutations' table; import data with 'infra data import'"],
    ),
    (
        "dotted-nested-conflict",
        lambda db: good(db, train={"lr": 0.1}, **{"train.lr": 0.2}),
        ["train.lr: given twice (nested and as a dotted key); keep one"],
    ),
    (
        "dotted-into-scalar",
        lambda db: good(db, train=3, **{"train.lr": 0.2}),
        ["train: is a number, but 'train.lr' sets a key inside it"],
    ),
    (
        "malformed-json",
        lambda db: '{"name": "x",\n  "data": {"db": 1}\n  "model": {}}',
        ["invalid JSON at line 3, column 3: Expecting ',' delimiter"],
    ),
    ("not-an-object", lambda db: "[1, 2]", ["a plan must be a JSON object, not a list"]),
    # issue 15: strict types as in the schema, finite and bounded numbers, repeated keys, nesting
    ("lr-numeric-string", lambda db: good(db, **{"train.lr": "0.1"}), ["train.lr: must be a number"]),
    ("batch-size-bool", lambda db: good(db, **{"train.batch_size": True}), ["train.batch_size: must be an integer"]),
    ("drop-nan-string", lambda db: good(db, **{"data.drop_nan": "no"}), ["data.drop_nan: must be true or false"]),
    (
        "weight-decay-infinity",
        lambda db: json.dumps(good(db, **{"train.weight_decay": 0.5})).replace("0.5", "Infinity"),
        [
            "train.weight_decay: must be a finite number (NaN, Infinity and numbers beyond ±1.8e308 are not JSON numbers)"
        ],
    ),
    (
        "lr-1e999",
        lambda db: json.dumps(good(db, **{"train.lr": 0.5})).replace("0.5", "1e999"),
        ["train.lr: must be a finite number (NaN, Infinity and numbers beyond ±1.8e308 are not JSON numbers)"],
    ),
    (
        "nan-in-params",
        lambda db: json.dumps(good(db, model={"name": "mlp", "params": {"dropout": 0.5}})).replace("0.5", "NaN"),
        [
            "model.params.dropout: must be a finite number (NaN, Infinity and numbers beyond ±1.8e308 are not JSON numbers)"
        ],
    ),
    ("train-seed-negative", lambda db: good(db, **{"train.seed": -1}), ["train.seed: must be >= 0"]),
    ("split-seed-huge", lambda db: good(db, **{"split.seed": 2**32}), ["split.seed: must be <= 4294967295"]),
    ("limit-1e30", lambda db: good(db, **{"data.limit": 1e30}), ["data.limit: must be <= 9223372036854775807"]),
    ("cpus-1e300", lambda db: good(db, **{"resources.cpus": 1e300}), ["resources.cpus: must be <= 4096"]),
    (
        "memory-beyond-any-machine",
        lambda db: good(db, **{"resources.memory": "99999999999g"}),
        ["resources.memory: '99999999999g' is larger than any machine; use e.g. '16g'"],
    ),
    (
        "memory-zero-would-mean-no-limit",
        lambda db: good(db, **{"resources.memory": "0"}),
        [
            "resources.memory: '0' is below 64m, too little to start the training core (0 would mean no limit); "
            "use e.g. '16g', or leave it out for none"
        ],
    ),
    (
        "shm-beyond-any-node",
        lambda db: good(db, **{"resources.shm_size": "9999g"}),
        ["resources.shm_size: '9999g' is outside 1m to 1024g; use e.g. '1g'"],
    ),
    (
        "shm-zero",
        lambda db: good(db, **{"resources.shm_size": "0"}),
        ["resources.shm_size: '0' is outside 1m to 1024g; use e.g. '1g'"],
    ),
    (
        "where-integer-beyond-sqlite",
        lambda db: good(db, data={"db": db, "where": [{"column": "id", "op": ">", "value": 2**64}]}),
        ["data.where[0].value: integers must lie within ±9223372036854775807 (SQLite's range)"],
    ),
    (
        "where-shapes-with-other-errors",
        lambda db: good(
            db,
            data={
                "db": db,
                "where": [
                    {"column": "mut_num", "op": "is_null", "value": 1},
                    {"column": "mutant", "op": "like", "value": 3},
                    {"column": "mut_num", "op": "<"},
                    {"column": "mut_num", "op": "not_in", "value": [[1]]},
                ],
            },
            train={"lr": -1},
        ),
        [
            "data.where[0].value: must be absent for op 'is_null'",
            "data.where[1].value: must be a string pattern for op 'like'",
            "data.where[2].value: must be a string, number or boolean for op '<'",
            "data.where[3].value: must be a non-empty list of scalars for op 'not_in'",
            "train.lr: must be > 0",
        ],
    ),
    (
        "repeated-keys",
        lambda db: (
            '{"name": "a", "name": "b", "data": {"db": ' + json.dumps(db) + ', "limit": 1, "limit": 2}, '
            '"model": {"name": "linear"}}'
        ),
        ["name: given twice in the JSON; keep one", "data.limit: given twice in the JSON; keep one"],
    ),
    (
        "nesting-100000-deep",
        lambda db: '{"name": "x", "model": {"name": "linear", "params": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}}",
        ["the JSON nests too deeply (a plan has at most 64 levels)"],
    ),
    (
        "nesting-70-deep",
        lambda db: good(db, model={"name": "linear", "params": {"a": nested(70)}}),
        [
            "model.params.a[0][0][0][0][0][0][0][0][0][0][0][0][0][0][0]…(64 levels): nests deeper than 64 levels; a plan never needs that"
        ],
    ),
]


@pytest.fixture
def bad_plan_env(tmp_path):
    from tests.conftest import make_db

    db = make_db(tmp_path / "plan-db.sqlite")
    (tmp_path / "NOTSQLITE").write_text("hello")
    sqlite3.connect(tmp_path / "NO_TABLES").execute("CREATE TABLE other(x)").connection.close()
    return tmp_path, db


@pytest.mark.parametrize("case_id,make,expected", BAD_PLANS, ids=[c[0] for c in BAD_PLANS])
def test_bad_plans(case_id, make, expected, bad_plan_env, monkeypatch):
    folder, db = bad_plan_env
    monkeypatch.chdir(folder)
    doc = make(str(db))
    messages = issues_of(doc)
    # data.db paths are reported as resolved; compare on the user-facing part
    messages = [m.replace(str(folder) + "/", "") for m in messages]
    assert messages == expected


def test_at_least_25_distinct_bad_plans():
    assert len({c[0] for c in BAD_PLANS}) >= 25


def test_schema_file_is_current():
    assert SCHEMA_PATH.read_text(encoding="utf-8") == render(plan_schema()), "run: python -m runner.plan.schema"


def test_schema_agrees_with_models_on_cases(mini_db):
    validator = jsonschema.Draft202012Validator(plan_schema())
    jsonschema.Draft202012Validator.check_schema(plan_schema())
    ok = good(
        str(mini_db),
        train={"lr": 0.01, "devices": 1},
        resources={"gpus": "0,2"},
        data={"db": str(mini_db), "dataset": ["a"]},
    )
    assert not list(validator.iter_errors(ok))
    for doc in (
        good(str(mini_db), train={"lr": -1}),
        good(str(mini_db), model={}),
        good(str(mini_db), extra=1),
        good(str(mini_db), resources={"gpus": "x"}),
        good(str(mini_db), name="UPPER"),
        # strings, booleans and fractions where the schema wants numbers, integers, booleans
        good(str(mini_db), train={"lr": "0.1"}),
        good(str(mini_db), train={"batch_size": True}),
        good(str(mini_db), train={"batch_size": 2.5}),
        good(str(mini_db), train={"max_epochs": "3"}),
        good(str(mini_db), train={"devices": True}),
        good(str(mini_db), resources={"gpus": True}),
        good(str(mini_db), resources={"cpus": "2"}),
        good(str(mini_db), data={"db": str(mini_db), "drop_nan": "no"}),
        good(str(mini_db), data={"db": str(mini_db), "drop_nan": 0}),
        good(str(mini_db), split={"test_fraction": False}),
        # bounds the libraries need
        good(str(mini_db), train={"seed": -1}),
        good(str(mini_db), train={"seed": 2**32}),
        good(str(mini_db), split={"seed": -1}),
        good(str(mini_db), data={"db": str(mini_db), "limit": 2**63}),
        good(str(mini_db), resources={"cpus": 1e300}),
        good(str(mini_db), resources={"cpus": 0.001}),
        good(str(mini_db), resources={"gpus": 10**6}),
        good(str(mini_db), train={"devices": 10**6}),
        good(str(mini_db), split={"n_folds": 5, "fold": 100}),
        # where-clause values that do not fit their op (WhereClause states the shapes in the schema)
        *(
            good(str(mini_db), data={"db": str(mini_db), "where": [clause]})
            for clause in (
                {"column": "mut_num", "op": "between", "value": [1]},
                {"column": "mut_num", "op": "in", "value": []},
                {"column": "mut_num", "op": "in", "value": 3},
                {"column": "mut_num", "op": "is_null", "value": 3},
                {"column": "mutant", "op": "like", "value": 3},
                {"column": "mut_num", "op": "="},
                {"column": "mut_num", "op": "=", "value": [1]},
            )
        ),
    ):
        assert list(validator.iter_errors(doc)), doc
        with pytest.raises(PlanError):
            load_plan("p", text=json.dumps(doc), check_db=False)
    # JSON has one number type: 256.0 is an integer to JSON Schema, and so to the models
    for doc in (
        good(str(mini_db), train={"batch_size": 256.0, "seed": 4294967295, "devices": 1.0}),
        good(str(mini_db), resources={"gpus": 2.0, "cpus": 2}),
        good(str(mini_db), data={"db": str(mini_db), "limit": 1e3}),
        good(
            str(mini_db),
            data={
                "db": str(mini_db),
                "where": [
                    {"column": "mut_num", "op": "between", "value": [1, 2.5]},
                    {"column": "mutant", "op": "not_in", "value": ["A1C", 3, True]},
                    {"column": "mut_num", "op": "is_null"},
                    {"column": "mut_num", "op": "not_null", "value": None},
                    {"column": "mutant", "op": "like", "value": "A%"},
                    {"column": "mut_num", "op": ">=", "value": 1},
                ],
            },
        ),
    ):
        assert not list(validator.iter_errors(doc)), doc
        load_plan("p", text=json.dumps(doc), check_db=False)


def test_expand_dotted_deep():
    out, issues = expand_dotted({"a.b.c": 1, "a": {"b": {"d": 2}}})
    assert issues == [] and out == {"a": {"b": {"c": 1, "d": 2}}}


def test_docs_plan_keys_table_is_current():
    from runner.plan.schema import plan_keys_table

    text = (SCHEMA_PATH.parent.parent / "docs" / "plans.md").read_text(encoding="utf-8")
    start = text.index("-->\n", text.index("<!-- keys:start")) + 4
    end = text.index("<!-- keys:end -->")
    assert text[start:end] == plan_keys_table(), (
        "regenerate the table in docs/plans.md from runner.plan.schema.plan_keys_table()"
    )
