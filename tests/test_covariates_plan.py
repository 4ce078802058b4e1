"""`data.covariates` in a plan (host tier, no torch): each names an extra column of the real database's
mutations table, once, at most 64 of them; the schema says the same; the columns are part of the id."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import jsonschema
import pytest

from runner.errors import PlanError
from runner.plan.load import load_plan
from runner.plan.schema import plan_schema
from runner.run.records import derive_experiment_id
from tests.conftest import make_db
from tests.helpers import cli


@pytest.fixture
def zs_db(tmp_path) -> Path:
    """The mini database with two extra numeric columns, as `--extra-columns` adds them."""
    path = make_db(tmp_path / "plan-db.sqlite")
    conn = sqlite3.connect(path)
    try:
        for name in ("esm1v_score", "evmutation"):
            conn.execute(f'ALTER TABLE mutations ADD COLUMN "{name}" NUMERIC')
            conn.execute(f'UPDATE mutations SET "{name}" = id * 0.5')
        conn.commit()
    finally:
        conn.close()
    return path


def doc(db: Path, covariates) -> dict:
    return {"name": "aug", "data": {"db": str(db), "covariates": covariates}, "model": {"name": "ridge"}}


def issues_of(document: dict) -> list[str]:
    with pytest.raises(PlanError) as info:
        load_plan("plan.json", text=json.dumps(document))
    return [str(i) for i in info.value.issues]


def test_covariates_naming_extra_columns_load(zs_db):
    loaded = load_plan("plan.json", text=json.dumps(doc(zs_db, ["esm1v_score", "evmutation"])))
    assert loaded.resolved["data"]["covariates"] == ["esm1v_score", "evmutation"]
    assert load_plan("plan.json", text=json.dumps(doc(zs_db, []))).resolved["data"]["covariates"] == []


@pytest.mark.parametrize(
    "covariates,expected",
    [
        (
            ["esm1v_score", "esm1v"],
            "data.covariates[1]: no column 'esm1v' in the mutations table of plan-db.sqlite; did you mean "
            "'esm1v_score'? (covariates are extra numeric columns: import them with 'infra data import "
            "--extra-columns')",
        ),
        (
            ["DMS_score"],
            "data.covariates[0]: 'DMS_score' is a standard column of the mutations table, not a covariate; "
            "available: esm1v_score, evmutation",
        ),
        (["mut_num"], "data.covariates[0]: 'mut_num' is a standard column of the mutations table, not a covariate"),
        (["esm1v_score", "esm1v_score"], "data.covariates: 'esm1v_score' is listed twice (items 0 and 1)"),
        ([f"c{i}" for i in range(65)], "data.covariates: List should have at most 64 items"),
        (["1bad"], "data.covariates[0]: "),
    ],
)
def test_bad_covariates_are_named(zs_db, covariates, expected):
    issues = issues_of(doc(zs_db, covariates))
    assert any(i.startswith(expected) for i in issues), issues


def test_a_database_without_extra_columns_says_so(tmp_path):
    db = make_db(tmp_path / "plain.sqlite")
    issues = issues_of(doc(db, ["esm1v_score"]))
    assert issues == [
        "data.covariates[0]: no column 'esm1v_score' in the mutations table of plain.sqlite; the table has no "
        "extra columns (covariates are extra numeric columns: import them with 'infra data import --extra-columns')"
    ]


def test_the_schema_refuses_what_the_loader_refuses(zs_db):
    schema = plan_schema()
    jsonschema.validate(doc(zs_db, ["esm1v_score"]), schema)
    for bad in (["a", "a"], [f"c{i}" for i in range(65)], ["1bad"]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc(zs_db, bad), schema)


def test_the_covariates_are_part_of_the_experiment_id(zs_db):
    ids = {
        derive_experiment_id(load_plan("plan.json", text=json.dumps(doc(zs_db, c))).resolved, "img")
        for c in ([], ["esm1v_score"], ["evmutation"], ["esm1v_score", "evmutation"])
    }
    assert len(ids) == 4


def test_infra_validate_names_an_unknown_covariate(tmp_path, zs_db):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(doc(zs_db, ["evmutaton"])))
    result = cli("validate", str(plan))
    assert result.returncode == 2
    assert "data.covariates[0]: no column 'evmutaton'" in result.stderr
    assert "did you mean 'evmutation'?" in result.stderr


def test_cnn_with_covariates_is_refused_by_the_plan_before_anything_starts(tmp_path, zs_db):
    """The built-in cnn reads per-position features: the plan check says so (it was the core's refusal at
    start, after the experiment existed), for one plan and for each point of a study."""
    assert issues_of({**doc(zs_db, ["evmutation"]), "model": {"name": "cnn"}}) == [
        "data.covariates: model 'cnn' convolves over residue positions, where covariates would be read as one "
        "more residue; use ridge, linear, mlp or ge with covariates, or drop data.covariates"
    ]
    load_plan("plan.json", text=json.dumps({**doc(zs_db, []), "model": {"name": "cnn"}}))  # cnn alone is fine
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(doc(zs_db, ["evmutation"])))
    result = cli("run", str(plan), "--sweep", "model.name=ridge,cnn", "--backend", "local", workdir=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "data.covariates: model 'cnn' convolves over residue positions" in result.stderr
    assert not (tmp_path / "experiments").exists() and not (tmp_path / "studies").exists()
