"""Data-driven end-to-end cases: every folder under tests/cases/ with an expected.json is one test.

A case is a workdir plus the `infra` commands to run in it and what each must produce. Commands
run as the non-root run user against the real Docker engine (the plugin image, the training in a
container). expected.json:

    {
      "description": "...",
      "workdir": "init" | "folder",   init: the first step creates it (`infra init {workdir}`);
                                      folder: a copy of the case's workdir/ folder
      "demo_db": "data/blat_ecolx.db",   optional: the bundled demo database written there first
      "steps": [{
        "args": ["run", "plans/demo.json", "--json"],   run in the workdir with INFRA_WORKDIR set
        "exit": 0,                                      expected exit code
        "stderr_contains": ["..."],  "stderr_lines": ["..."],   substrings / whole lines of stderr
        "json": {...},               stdout's JSON document contains this (dicts: subset; lists: prefix)
        "json_includes": [{...}],    stdout is a JSON list with an element containing each of these
        "min": {"test.spearman": 0.3},   lower bounds of numbers in stdout's JSON (dotted paths, list indices)
        "log_contains": ["..."],     substrings of the experiment's logs/container.log
        "save": {"name": "experiment_id"}   remember a JSON value for later steps as {name}
      }]
    }

In strings, `{workdir}` is the case's workdir, `{name}` a saved value, and in `stderr_lines` `{*}`
matches any text. Add a case by adding a folder; nothing here needs to change.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.e2e import infra_as

CASES = Path(__file__).resolve().parent / "cases"
CASE_DIRS = sorted(p for p in CASES.iterdir() if (p / "expected.json").is_file())


def _fill(value, names: dict):
    """Replace {workdir} and saved {names} in every string of a JSON value."""
    if isinstance(value, str):
        for key, text in names.items():
            value = value.replace("{" + key + "}", str(text))
        return value
    if isinstance(value, list):
        return [_fill(v, names) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, names) for k, v in value.items()}
    return value


def _get(doc, path: str):
    for part in path.split("."):
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def _contains(actual, expected, where: str = "$") -> None:
    """Assert `actual` contains `expected`: dict keys subset, list element-wise prefix, scalars equal."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: expected an object, got {actual!r}"
        for key, value in expected.items():
            assert key in actual, f"{where}.{key} missing in {sorted(actual)}"
            _contains(actual[key], value, f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) >= len(expected), f"{where}: {actual!r}"
        for i, value in enumerate(expected):
            _contains(actual[i], value, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def _line_pattern(text: str) -> re.Pattern:
    return re.compile(".+?".join(re.escape(part) for part in text.split("{*}")))


def _check_step(step: dict, result, names: dict) -> None:
    shown = f"infra {' '.join(step['args'])}\nstdout: {result.stdout[-1500:]}\nstderr: {result.stderr[-3000:]}"
    assert result.returncode == step.get("exit", 0), shown
    for text in step.get("stderr_contains", []):
        assert text in result.stderr, shown
    lines = result.stderr.splitlines()
    for text in step.get("stderr_lines", []):
        pattern = _line_pattern(text)
        assert any(pattern.fullmatch(line) for line in lines), f"no stderr line matches {text!r}\n{shown}"
    doc = None
    if any(k in step for k in ("json", "json_includes", "min", "save", "log_contains")):
        doc = json.loads(result.stdout)
    if "json" in step:
        _contains(doc, step["json"])
    for item in step.get("json_includes", []):
        assert any(_matches(row, item) for row in doc), f"no element contains {item}\n{shown}"
    for path, bound in step.get("min", {}).items():
        value = _get(doc, path)
        assert isinstance(value, int | float) and value >= bound, f"{path} = {value!r} < {bound}"
    for text in step.get("log_contains", []):
        log = (Path(doc["exp_dir"]) / "container.log").read_text()
        assert text in log, f"{text!r} not in container.log:\n{log[-2000:]}"
    for name, path in step.get("save", {}).items():
        names[name] = _get(doc, path)


def _matches(row, item: dict) -> bool:
    try:
        _contains(row, item)
    except AssertionError:
        return False
    return True


@pytest.fixture
def case_root(run_user):
    """An empty folder under /tmp owned by the run user (pytest's tmp dirs are private to root)."""
    top = Path(tempfile.mkdtemp(prefix="infra-case-", dir="/tmp"))
    os.chown(top, run_user[0], run_user[1])
    yield top
    shutil.rmtree(top, ignore_errors=True)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize("case", CASE_DIRS, ids=[p.name for p in CASE_DIRS])
def test_case(case: Path, base_image, run_user, case_root, docker_client):
    from runner.data.importer import build_demo_db

    expected = json.loads((case / "expected.json").read_text())
    workdir = case_root / "work"
    if expected.get("workdir", "folder") == "folder":
        shutil.copytree(case / "workdir", workdir)
    if expected.get("demo_db"):
        (workdir / expected["demo_db"]).parent.mkdir(parents=True, exist_ok=True)
        build_demo_db(workdir / expected["demo_db"])
    for path in [workdir, *workdir.rglob("*")] if workdir.exists() else []:
        os.chown(path, run_user[0], run_user[1])
    names = {"workdir": workdir}
    for step in expected["steps"]:
        step = {**step, **_fill({k: v for k, v in step.items() if k != "args"}, names)}
        step["args"] = _fill(step["args"], names)
        started = time.monotonic()
        result = _infra(run_user, step["args"], workdir, case_root)
        print(
            f"{case.name}: infra {' '.join(step['args'])} -> {result.returncode} ({time.monotonic() - started:.1f} s)"
        )
        _check_step(step, result, names)
    assert _left_behind(docker_client, workdir) == []


def _left_behind(client, workdir: Path) -> list[str]:
    """Names of this case's containers still in the engine: discovery ones and its experiments'."""
    from runner.run.spec import LABEL_PURPOSE

    ids = {p.name for p in (workdir / "experiments").glob("*")} if (workdir / "experiments").exists() else set()
    found = client.api.containers(all=True, filters={"label": f"{LABEL_PURPOSE}=plugin-discovery"})
    found += [
        c
        for c in client.api.containers(all=True, filters={"label": "infra.experiment_id"})
        if c["Labels"].get("infra.experiment_id") in ids
    ]
    return [c["Names"][0] for c in found]


def _infra(run_user, args: list[str], workdir: Path, case_root: Path):
    """`infra ARGS` as the run user in the workdir (in the case root until `infra init` made it)."""
    if workdir.exists():
        return infra_as(run_user, *args, workdir=workdir)
    return infra_as(run_user, *args, workdir=case_root)
