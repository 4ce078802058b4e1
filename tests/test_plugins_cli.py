"""`infra plugins list|check`: discovery out of process, the documented failure messages, the CI example.

The local-backend tests load real plugins in a real host subprocess (`python -m runner.core.plugins`);
the same checks inside the plugin image are the data-driven cases in tests/cases/ (docker).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runner.errors import EnvironmentProblem
from runner.workdir.plugins import PluginLoadError, map_paths, parse_output
from tests.helpers import cli

REPO = Path(__file__).resolve().parent.parent
TEMPLATE_PLUGINS = {
    ("model", "tiny_attention", "model/tiny_attention.py"),
    ("embedding", "physchem", "embed/physchem.py"),
    ("metric", "topk_recall", "metrics/topk_recall.py"),
    ("vocab", "IUPAC_gapped", "vocab/with_gaps.py"),
}
SYNTAX_ERROR = "x = 1\ndef broken(:\n    pass\n"
SECOND_LINEAR = (
    "from runner.core.models import ProteinModel, register_model\n\n\n"
    "@register_model('linear')\n"
    "class AnotherLinear(ProteinModel):\n"
    "    pass\n"
)


@pytest.fixture
def template_copy(tmp_path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(REPO / "plugins_template", work)
    return work


# --- pure parts -------------------------------------------------------------------------------------


def test_map_paths_rewrites_only_the_image_workdir():
    text = "plugin /workdir/model/x.py:3: boom (/opt/venv/lib/runner/core/models.py:46) /workdir2/y /a/workdir/z"
    assert map_paths(text, Path("/home/me/work")) == (
        "plugin /home/me/work/model/x.py:3: boom (/opt/venv/lib/runner/core/models.py:46) /workdir2/y /a/workdir/z"
    )


def test_parse_output_success_maps_plugin_files():
    rows = [
        {
            "kind": "model",
            "name": "m",
            "source_file": "/workdir/model/m.py",
            "builtin": False,
            "params": [],
            "open_params": False,
        }
    ]
    assert parse_output(0, json.dumps(rows), "", Path("/w"), "image x")[0]["source_file"] == "/w/model/m.py"


def test_parse_output_plugin_error_has_file_line_error():
    stderr = "some warning\ninfra plugins: plugin /workdir/model/b.py:2: SyntaxError: invalid syntax; fix the file and run again\n"
    with pytest.raises(PluginLoadError) as info:
        parse_output(1, "", stderr, Path("/w"), "image x")
    assert info.value.message == "plugin /w/model/b.py:2: SyntaxError: invalid syntax; fix the file and run again"
    assert (info.value.file, info.value.line, info.value.error) == ("/w/model/b.py", 2, "SyntaxError")
    assert info.value.exit_code == 1


def test_parse_output_without_core_is_an_environment_problem():
    with pytest.raises(EnvironmentProblem, match="exited with code 1; is the training core installed there"):
        parse_output(1, "", "/usr/bin/python: No module named runner.core.plugins\n", Path("/w"), "a local subprocess")


@pytest.mark.parametrize(
    ("params", "why"),
    [
        ({}, "params is not a list"),
        ([{"name": "x"}], "params item 0 is not an object of name, type, default, required"),
        ([{"name": "x\x1b[2J", "type": None, "default": 1, "required": False}], "params item 0 has a name"),
        ([{"name": "x", "type": None, "default": [1], "required": False}], "params item 0 has a name"),
        ([{"name": "x", "type": None, "default": 1, "required": "no"}], "params item 0: required is not true or false"),
        ([{"name": "x", "type": None, "default": "y" * 201, "required": False}], "params item 0 has a name"),
    ],
)
def test_discovered_params_are_checked_as_untrusted(params, why):
    from runner.workdir.plugins import DiscoveryOutputError, check_document

    row = {
        "kind": "model",
        "name": "m",
        "source_file": "/w/m.py",
        "builtin": False,
        "params": params,
        "open_params": False,
    }
    with pytest.raises(DiscoveryOutputError, match=f"item 0: {why}".replace("[", "\\[")):
        check_document(json.dumps([row]), Path("/w"), "image x")


def test_params_text():
    from runner.workdir.plugins import params_text

    params = [
        {"name": "hidden", "type": "int", "default": 64, "required": False},
        {"name": "base", "type": None, "default": "ridge", "required": False},
        {"name": "alpha", "type": "float", "default": None, "required": True},
    ]
    assert params_text(params) == "hidden: int = 64, base = 'ridge', alpha: float (required)"
    assert params_text([]) == "-"


# --- local backend: real plugins in a host subprocess ---------------------------------------------------


@pytest.mark.core
def test_list_json_has_every_template_plugin(template_copy):
    result = cli("plugins", "list", "--json", "--backend", "local", "--workdir", str(template_copy))
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {tuple(sorted(r)) for r in rows} == {("builtin", "kind", "name", "open_params", "params", "source_file")}
    plugins = {(r["kind"], r["name"], r["source_file"]) for r in rows if not r["builtin"]}
    assert plugins == {(k, n, str(template_copy / f)) for k, n, f in TEMPLATE_PLUGINS}
    builtins = {(r["kind"], r["name"]) for r in rows if r["builtin"]}
    assert {("model", "linear"), ("embedding", "onehot"), ("metric", "spearman"), ("vocab", "IUPAC")} <= builtins
    params = {(r["kind"], r["name"]): r["params"] for r in rows}
    assert params[("model", "tiny_attention")][0] == {
        "name": "d_model",
        "type": "int",
        "default": 32,
        "required": False,
    }
    # seq_len, in_dim: the runner's
    assert [p["name"] for p in params[("model", "linear")]] == ["l2", "lr_scale", "init"]
    assert params[("metric", "ndcg")] == [{"name": "top_fraction", "type": "float", "default": 0.1, "required": False}]
    assert params[("metric", "spearman")] == [] and params[("split", "random")] == []


@pytest.mark.core
def test_list_table_marks_builtins(template_copy):
    result = cli("plugins", "list", "--backend", "local", "--workdir", str(template_copy))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "SOURCE", "PARAMETERS"]
    assert any(
        line.split()[:5] == ["model", "tiny_attention", "model/tiny_attention.py", "d_model:", "int"] for line in lines
    )
    columns = [re.split(r"\s{2,}", line.strip()) for line in lines]  # the table's columns are 2+ spaces apart
    assert ["model", "linear", "(built-in)", "l2: float = 1.0, lr_scale: float = 10.0, init: str = 'ridge'"] in columns
    assert any(line.split() == ["metric", "spearman", "(built-in)", "-"] for line in lines)
    assert "4 plugin component(s)" in result.stderr


@pytest.mark.core
def test_check_ok(template_copy):
    result = cli("plugins", "check", "--backend", "local", "--workdir", str(template_copy))
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(f"ok: 4 plugin component(s) in {template_copy} load")


@pytest.mark.core
def test_check_syntax_error_message(template_copy):
    (template_copy / "model" / "broken.py").write_text(SYNTAX_ERROR)
    result = cli("plugins", "check", "--backend", "local", "--workdir", str(template_copy))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"infra: error: plugin {template_copy}/model/broken.py:2: SyntaxError: invalid syntax; "
        "fix the file and run again"
    )
    listed = cli("plugins", "list", "--json", "--backend", "local", "--workdir", str(template_copy))
    assert listed.returncode == 1
    assert json.loads(listed.stdout)["error"]["exit_code"] == 1


@pytest.mark.core
def test_check_duplicate_name_message(template_copy):
    listed = cli("plugins", "list", "--json", "--backend", "local", "--workdir", str(template_copy))
    linear = next(r for r in json.loads(listed.stdout) if (r["kind"], r["name"]) == ("model", "linear"))
    (template_copy / "model" / "second_linear.py").write_text(SECOND_LINEAR)
    result = cli("plugins", "check", "--json", "--backend", "local", "--workdir", str(template_copy))
    assert result.returncode == 1
    plugin = template_copy / "model" / "second_linear.py"
    source_lines = Path(linear["source_file"]).read_text().splitlines()
    line = source_lines.index('@register_model("linear")') + 1  # where the built-in is registered
    message = (
        f"plugin {plugin}:4: RegistryError: model 'linear' is registered twice: by runner.core.models:LinearModel "
        f"({linear['source_file']}:{line}) and by infra_ext.model.second_linear:AnotherLinear ({plugin}:4); "
        "rename one of them; fix the file and run again"
    )
    assert json.loads(result.stdout) == {
        "ok": False,
        "message": message,
        "file": str(plugin),
        "line": 4,
        "error": "RegistryError",
    }
    assert result.stderr.strip() == f"infra: error: {message}"


@pytest.mark.core
def test_discovery_never_imports_plugins_on_the_host(template_copy):
    probe = (
        "import sys; from runner.workdir.plugins import discover; "
        f"from runner.run.backends import backend_for; found = discover({str(template_copy)!r}, backend_for('local')); "
        "print(len(found.plugins()), sorted(m for m in sys.modules if m.startswith(('infra_ext', 'torch'))))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "4 []"


def test_unknown_backend_is_usage_error(template_copy):
    result = cli("plugins", "list", "--backend", "podman", "--workdir", str(template_copy))
    assert result.returncode == 2
    assert (
        "Invalid value for '--backend'" in result.stderr and "'podman' is not one of 'docker', 'local'" in result.stderr
    )


def test_commands_have_help_and_examples():
    for args in (["plugins", "list"], ["plugins", "check"], ["compare"]):
        result = cli(*args, "--help")
        assert result.returncode == 0, result.stderr
        assert "Example: infra" in result.stdout


# --- CI for plugin images ---------------------------------------------------------------------------


def test_example_workflow_builds_the_bake_plugins_target():
    text = (REPO / "examples" / "ci" / "github-actions.yml").read_text()
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(text)
    triggers = doc.get("on", doc.get(True))  # PyYAML reads the bare key `on` as True
    assert "push" in triggers
    steps = [s for job in doc["jobs"].values() for s in job["steps"]]
    runs = "\n".join(s.get("run", "") for s in steps)
    assert "python -m runner.images.builds context" in runs
    assert "docker buildx bake plugins" in runs
    bake = (REPO / "docker-bake.hcl").read_text()
    for variable in ("PLUGIN_CONTEXT", "PLUGIN_TAG", "BASE_TAG"):
        assert f'variable "{variable}"' in bake
        assert variable in text
    assert "github.sha" in text and "content_hash" in text.lower()


def test_bake_context_command_writes_the_plugin_context(template_copy, tmp_path):
    out = tmp_path / "ctx"
    result = subprocess.run(
        [sys.executable, "-m", "runner.images.builds", "context", str(template_copy), str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "Dockerfile").read_text() == (REPO / "images" / "plugins" / "Dockerfile").read_text()
    assert (out / "workdir" / "model" / "tiny_attention.py").is_file()
    assert (out / "requirements.txt").is_file()
