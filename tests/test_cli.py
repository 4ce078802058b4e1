"""The `infra` command line: exit codes, messages, stdout/stderr discipline.

The command line's own behaviour runs in-process (`cli`); `test_in_process_equals_the_process` checks
on a spread of commands that a real `infra` process gives the same exit code, stdout and stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import cli, infra

REPO = Path(__file__).resolve().parent.parent


def wkdir(*args, env=None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", "import sys; from runner.cli.wkdir_alias import main; sys.exit(main())", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
    )


def plan_file(tmp_path: Path, db: Path, **extra) -> Path:
    doc = {"name": "demo", "data": {"db": str(db)}, "model": {"name": "linear"}, **extra}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    return path


def test_validate_good_plan(tmp_path, mini_db):
    result = cli("validate", str(plan_file(tmp_path, mini_db)))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "valid (name demo, model linear" in result.stderr


def test_validate_json_good_and_bad(tmp_path, mini_db):
    good = cli("validate", str(plan_file(tmp_path, mini_db)), "--json")
    doc = json.loads(good.stdout)
    assert good.returncode == 0 and doc["valid"] is True and doc["errors"] == []
    assert doc["plan"]["train"]["lr"] == 0.001
    bad = cli("validate", str(plan_file(tmp_path, mini_db, train={"lr": 0})), "--json")
    assert bad.returncode == 2
    errors = [{"path": "train.lr", "message": "must be > 0"}]
    assert json.loads(bad.stdout) == {
        "valid": False,
        "source": str(tmp_path / "plan.json"),
        "errors": errors,
        "error": {
            "type": "PlanError",
            "message": f"{tmp_path / 'plan.json'}: train.lr: must be > 0",
            "exit_code": 2,
            "errors": errors,
        },
    }
    assert bad.stdout.count("\n") == 1  # exactly one document


def test_validate_stdin_and_set(tmp_path, mini_db):
    doc = {"name": "demo", "data": {"db": str(mini_db)}, "model": {"name": "linear"}}
    result = cli("validate", "-", "--set", "train.lr=-1", "--set", "model.name=cnn", input=json.dumps(doc))
    assert result.returncode == 2
    assert result.stderr.strip() == "infra: error: <stdin>: train.lr: must be > 0"


def test_validate_missing_file_exit_2():
    result = cli("validate", "no-such-plan.json")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "infra: error: plan file no-such-plan.json does not exist; check the path (or pass '-' to read stdin)"
    )


def test_unknown_command_and_option_exit_2():
    assert cli("frobnicate").returncode == 2
    assert cli("validate", "--nope").returncode == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["validate", "--json", "--nope"], "infra validate: No such option: --nope (see 'infra validate --help')"),
        (["status", "--json"], "infra status: Missing argument 'experiment_id'. (see 'infra status --help')"),
        (["ls", "--json", "--state"], "infra: Option '--state' requires an argument. (see 'infra --help')"),
    ],
)
def test_usage_errors_with_json_print_one_error_document(args, message):
    result = cli(*args)
    assert result.returncode == 2
    assert json.loads(result.stdout) == {"error": {"type": "UsageError", "message": message, "exit_code": 2}}
    assert result.stdout.count("\n") == 1
    assert result.stderr.strip() == f"infra: error: {message}"


def test_version():
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("infra ")


def test_schema_command_prints_published_schema():
    result = cli("schema")
    assert result.returncode == 0
    assert result.stdout == (REPO / "schemas" / "plan.schema.json").read_text()


def test_workdir_roundtrip_and_alias(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    assert cli("workdir", "get").returncode == 2
    unset = wkdir("--get")
    assert unset.returncode == 2
    assert "no workdir is set; set one with 'infra workdir set PATH'" in unset.stderr
    assert cli("workdir", "set", str(work)).returncode == 0
    assert cli("workdir", "get").stdout.strip() == str(work)
    assert wkdir("--get").stdout.strip() == str(work)
    assert json.loads(cli("workdir", "get", "--json").stdout) == {"workdir": str(work)}
    # INFRA_WORKDIR overrides the stored value
    other = tmp_path / "other"
    other.mkdir()
    assert cli("workdir", "get", env={"INFRA_WORKDIR": str(other)}).stdout.strip() == str(other)
    assert wkdir("--clear").returncode == 0
    assert cli("workdir", "get").returncode == 2
    assert wkdir("--set", str(work)).returncode == 0
    assert cli("workdir", "get").stdout.strip() == str(work)
    assert cli("workdir", "clear").returncode == 0
    assert wkdir("--get").returncode == 2


def test_init_says_how_commands_find_the_new_workdir(tmp_path):
    work = tmp_path / "w"
    result = cli("init", str(work))
    assert result.returncode == 0, result.stderr
    ready, how = result.stderr.splitlines()
    assert ready.startswith(f"workdir {work} ready (") and ready.endswith(
        f"next: infra data demo --db {work}/data/blat_ecolx.db"
    )
    assert how == f"commands use it with --workdir {work}, INFRA_WORKDIR={work}, or after 'infra workdir set {work}'"
    other = tmp_path / "v"
    stored = cli("init", str(other), "--set-workdir")
    assert stored.returncode == 0 and len(stored.stderr.splitlines()) == 1  # it is the workdir now: nothing to say
    assert cli("workdir", "get").stdout.strip() == str(other.resolve())


def test_workdir_set_nonexistent_is_exit_2(tmp_path):
    result = cli("workdir", "set", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert f"workdir {tmp_path / 'missing'} is not an existing directory" in result.stderr


def test_wkdir_alias_flags_are_exclusive():
    assert wkdir("--get", "--clear").returncode == 2
    assert wkdir().returncode == 2


def test_json_error_document_for_infra_errors():
    result = cli("workdir", "get", "--json")
    assert result.returncode == 2
    doc = json.loads(result.stdout)
    assert doc["error"]["type"] == "WorkdirError" and doc["error"]["exit_code"] == 2


def _commands(group, prefix=()):
    for name, cmd in sorted(group.commands.items()):
        yield prefix + (name,), cmd
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, prefix + (name,))


def test_every_command_has_help_and_example():
    import typer.main

    from runner.cli import app

    root = typer.main.get_command(app)
    missing = []
    for path, cmd in _commands(root):
        text = cmd.help or ""
        if not text.strip():
            missing.append(" ".join(path))
        elif not hasattr(cmd, "commands") and "Example:" not in text:
            missing.append(" ".join(path) + " (no example)")
    assert missing == []


@pytest.mark.parametrize("entry", ["runner.cli", "runner.cli.wkdir_alias"])
def test_cli_import_stays_light(entry):
    code = (
        f"import sys; import {entry}; "
        "heavy = [m for m in ('torch', 'docker', 'pandas', 'numpy', 'lightning', 'runner.core') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_validate_does_not_import_heavy_modules(tmp_path, mini_db):
    path = plan_file(tmp_path, mini_db)
    code = (
        "import sys\n"
        "from runner.cli import main\n"
        "try:\n"
        f"    main(['validate', {str(path)!r}])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print(','.join(m for m in ('torch', 'docker', 'pandas', 'numpy', 'jsonschema') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("command", [["status"], ["logs"], ["stop"], ["track"], ["status", "--json"]])
def test_unknown_experiment_exit_4(tmp_path, command):
    result = cli(command[0], "blat-0000000000", *command[1:], env={"INFRA_WORKDIR": str(tmp_path)})
    assert result.returncode == 4
    assert f"no experiment 'blat-0000000000' in {tmp_path / 'experiments'}; list them with 'infra ls'" in (
        result.stderr + result.stdout
    )


def test_run_without_workdir_is_exit_2(tmp_path, mini_db):
    result = cli("run", str(plan_file(tmp_path, mini_db)))
    assert result.returncode == 2
    assert "no workdir is set; set one with 'infra workdir set PATH'" in result.stderr


@pytest.mark.parametrize(
    ("args", "stdin"),
    [
        (["validate", "{plan}"], None),
        (["validate", "-", "--json"], "{doc}"),
        (["validate", "{bad}", "--json"], None),
        (["validate", "--json", "--nope"], None),
        (["frobnicate"], None),
        (["--debug", "status", "blat-0000000000"], None),
        (["workdir", "get", "--json"], None),
        (["config", "--help"], None),
        (["--version"], None),
        (["-v", "data", "import", "{csv}", "--db", "new.db", "--source", "demo", "--template", "{template}"], None),
    ],
)
def test_in_process_equals_the_process(tmp_path, mini_db, args, stdin):
    """What the in-process runner gives is what a user's `infra` process gives, byte for byte
    (including a --debug traceback and -v log lines)."""
    from runner.data.importer import DEMO_CSV, DEMO_TEMPLATE

    plan, bad = plan_file(tmp_path, mini_db), tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "demo", "data": {"db": str(mini_db)}, "model": {"name": "linear"}, "x": 1}))
    names = {
        "plan": str(plan),
        "bad": str(bad),
        "doc": plan.read_text(),
        "csv": str(DEMO_CSV),
        "template": DEMO_TEMPLATE,
    }
    args = [a.format(**names) for a in args]
    stdin = stdin.format(**names) if stdin else None
    before = set(tmp_path.iterdir())
    inside = cli(*args, workdir=tmp_path, input=stdin)
    for made in set(tmp_path.iterdir()) - before:  # the process starts from the same files
        made.unlink()
    outside = infra(*args, workdir=tmp_path, input=stdin)
    assert (inside.returncode, inside.stdout, inside.stderr) == (outside.returncode, outside.stdout, outside.stderr)
