"""`infra config get|set|unset|list`: node settings in a real config file, the environment overriding,
and shell completion (`--show-completion`, `--install-completion`, completing a command)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runner.errors import UsageError
from runner.settings import KEYS, config_file, describe_settings, node_settings, set_setting, unset_setting
from tests.helpers import REPO, cli

NO_NODE_ENV = {key.env: "" for key in KEYS.values()}  # the test's own environment must not leak in


def config_env() -> dict:
    return {**NO_NODE_ENV, "XDG_CONFIG_HOME": os.environ["XDG_CONFIG_HOME"]}


def test_set_get_list_unset_round_trip():
    env = config_env()
    result = cli("config", "set", "torch_spec", "torch==2.13.0", env=env)
    assert result.returncode == 0, result.stderr
    assert f"torch_spec = torch==2.13.0 stored in {config_file()}" in result.stderr
    assert json.loads(config_file().read_text())["node"] == {"torch_spec": "torch==2.13.0"}
    got = cli("config", "get", "torch_spec", env=env)
    assert (got.stdout, got.stderr) == ("torch==2.13.0\n", "torch_spec: from config\n")
    assert cli("config", "set", "INFRA_LOG_LIMIT", "200M", env=env).returncode == 0  # the variable's name works too
    listed = json.loads(cli("config", "list", "--json", env=env).stdout)
    rows = {r["key"]: r for r in listed["settings"]}
    assert listed["config_file"] == str(config_file())
    assert rows["log_limit_bytes"] == {**rows["log_limit_bytes"], "value": 200 << 20, "source": "config"}
    assert rows["pids_limit"]["source"] == "default" and rows["pids_limit"]["value"] == 4096
    assert node_settings(env=NO_NODE_ENV).torch_spec == "torch==2.13.0"  # what builds and runs now read
    human = cli("config", "list", env=env)
    header, *lines = human.stdout.splitlines()
    assert header.split() == ["KEY", "VALUE", "SOURCE", "ENV"]
    assert ["torch_spec", "torch==2.13.0", "config", "INFRA_TORCH_SPEC"] in [line.split() for line in lines]
    assert "(INFRA_* environment variables override it)" in human.stderr
    removed = cli("config", "unset", "torch_spec", "--json", env=env)
    assert json.loads(removed.stdout) == {"key": "torch_spec", "removed": True, "config_file": str(config_file())}
    again = cli("config", "unset", "torch_spec", env=env)
    assert again.returncode == 0 and "torch_spec was not stored" in again.stderr
    assert json.loads(config_file().read_text())["node"] == {"log_limit_bytes": 200 << 20}


def test_environment_overrides_the_file_and_list_says_so():
    set_setting("base_os", "infra-os:bookworm")
    env = {**config_env(), "INFRA_BASE_OS": "debian:12"}
    got = cli("config", "get", "base_os", "--json", env=env)
    doc = json.loads(got.stdout)
    assert (doc["value"], doc["source"], doc["stored"]) == ("debian:12", "env", "infra-os:bookworm")
    human = cli("config", "list", env=env)
    line = next(line for line in human.stdout.splitlines() if line.startswith("base_os"))
    assert line.split() == [
        "base_os",
        "debian:12",
        "env",
        "(overrides",
        "config",
        "infra-os:bookworm)",
        "INFRA_BASE_OS",
    ]
    setting = cli("config", "set", "base_os", "infra-os:trixie", env=env)
    assert "note: INFRA_BASE_OS is set in this environment and takes precedence" in setting.stderr
    assert node_settings(env={"INFRA_BASE_OS": "debian:12"}).base_os == "debian:12"
    assert node_settings(env={}).base_os == "infra-os:trixie"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["set", "torch", "x"],
            "unknown node setting 'torch'; valid keys: base_image, base_os, torch_spec, wheelhouse",
        ),
        (["get", "nope"], "unknown node setting 'nope'; valid keys: base_image"),
        (["set", "pids_limit", "12"], "infra config set pids_limit='12': must be a whole number from 64 to 4194304"),
        (["set", "train_uid", "0"], "containers run as an unprivileged user; set a number other than 0"),
        (["set", "log_limit_bytes", "lots"], "use a size of at least 1M, like 100M or 2G"),
        (["set", "base_os", "a\tb"], "infra config set base_os: must be a non-empty line of text"),
        (["set", "base_os", " "], "must be a non-empty line of text"),
        (["set", "torch_spec", "--", "--index-url=https://evil.example/simple"], "use a requirement specifier only"),
        (["set", "torch_spec", "torch==2.13.0 --index-url=https://evil.example/simple"], "no pip options"),
        (["set", "torch_spec", "torch @ https://evil.example/torch.whl"], "use a requirement specifier only"),
        (["set", "tracking_hosts", "ftp://mlflow.lab"], "infra config set tracking_hosts: use a comma-separated"),
        (["set", "tracking_hosts", "mlflow.lab:70000"], "servers as HOST or HOST:PORT"),
        (["set", "tracking_timeout", "0"], "must be a whole number from 1 to 3600"),
    ],
)
def test_bad_key_or_value_is_exit_2_and_writes_nothing(args, message):
    result = cli("config", *args, env=config_env())
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.startswith("infra: error: ")
    assert not config_file().exists()


def test_a_damaged_config_file_is_named():
    config_file().parent.mkdir(parents=True, exist_ok=True)
    config_file().write_text('{"node": [1]}')
    result = cli("config", "list", env=config_env())
    assert result.returncode == 2 and f"config file {config_file()}: 'node' must be an object" in result.stderr
    config_file().write_text("{")
    result = cli("config", "set", "base_os", "x", env=config_env())
    assert result.returncode == 2 and f"config file {config_file()} is unreadable" in result.stderr
    assert config_file().read_text() == "{"


def test_a_workdir_of_the_wrong_kind_in_the_config_file_is_one_line_naming_file_and_key(tmp_path):
    config_file().parent.mkdir(parents=True, exist_ok=True)
    config_file().write_text('{"workdir": 5}')
    for args in (["ls"], ["workdir", "get"], ["config", "list"]):
        result = cli(*args, env=config_env())
        assert result.returncode == 2, (args, result.stderr)
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"infra: error: config file {config_file()}: 'workdir' must be a folder's path as text")


def test_a_fifo_at_the_config_file_is_refused_not_waited_on():
    """Reading the config file must not block: a FIFO there hung every command."""
    config_file().parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(config_file())
    result = subprocess.run(
        [sys.executable, "-m", "runner", "config", "list"],
        env={**os.environ, **config_env(), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,  # a guard against hanging the suite, as the old code did; not a measure of speed
    )
    assert result.returncode == 2
    assert f"config file {config_file()} is not a regular file; delete it" in result.stderr


def test_a_link_or_an_oversized_config_file_is_refused(tmp_path):
    target = tmp_path / "elsewhere.json"
    target.write_text('{"node": {"base_os": "x"}}')
    config_file().parent.mkdir(parents=True, exist_ok=True)
    config_file().symlink_to(target)
    result = cli("config", "list", env=config_env())
    assert result.returncode == 2 and "is a symbolic link; infra reads only a regular file there" in result.stderr
    config_file().unlink()
    config_file().write_text('{"node": {}, "pad": "' + "x" * (1 << 20) + '"}')
    result = cli("config", "list", env=config_env())
    assert result.returncode == 2 and "is larger than 1 MiB" in result.stderr


def test_torch_spec_with_pip_options_is_refused_from_every_source():
    assert set_setting("torch_spec", "torch>=2.2,<3") == ("torch_spec", "torch>=2.2,<3")
    assert node_settings(env={}).torch_spec == "torch>=2.2,<3"
    with pytest.raises(UsageError, match="INFRA_TORCH_SPEC='torch --extra-index-url=x': use a requirement"):
        node_settings(env={"INFRA_TORCH_SPEC": "torch --extra-index-url=x"})
    config_file().write_text(json.dumps({"node": {"torch_spec": "-r /etc/shadow"}}))
    with pytest.raises(UsageError, match=f"{config_file()} node.torch_spec='-r /etc/shadow'"):
        node_settings(env={})


def test_tracking_hosts_round_trip_and_list_as_set_takes_them():
    env = config_env()
    result = cli("config", "set", "tracking_hosts", "MLflow.lab:5000, 10.0.0.5,[::1]:5000", env=env)
    assert result.returncode == 0, result.stderr
    assert "tracking_hosts = mlflow.lab:5000,10.0.0.5,[::1]:5000 stored in" in result.stderr
    assert json.loads(config_file().read_text())["node"]["tracking_hosts"] == [
        "mlflow.lab:5000",
        "10.0.0.5",
        "[::1]:5000",
    ]
    assert node_settings(env={}).tracking_hosts == ("mlflow.lab:5000", "10.0.0.5", "[::1]:5000")
    got = cli("config", "get", "tracking_hosts", env=env)
    assert got.stdout == "mlflow.lab:5000,10.0.0.5,[::1]:5000\n"
    line = next(
        line for line in cli("config", "list", env=env).stdout.splitlines() if line.startswith("tracking_hosts")
    )
    assert line.split() == ["tracking_hosts", "mlflow.lab:5000,10.0.0.5,[::1]:5000", "config", "INFRA_TRACKING_HOSTS"]
    assert node_settings(env={"INFRA_TRACKING_HOSTS": "a.lab"}).tracking_hosts == ("a.lab",)
    assert node_settings(env={"INFRA_TRACKING_TIMEOUT": "5"}).tracking_timeout == 5
    assert cli("config", "unset", "tracking_hosts", env=env).returncode == 0
    assert node_settings(env={}).tracking_hosts == ()


def test_wheelhouse_is_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert set_setting("wheelhouse", "wheels") == ("wheelhouse", str(tmp_path / "wheels"))
    rows = {r["key"]: r for r in describe_settings(env={})}
    assert rows["wheelhouse"]["value"] == str(tmp_path / "wheels")
    assert unset_setting("wheelhouse") == ("wheelhouse", True)
    with pytest.raises(UsageError, match="valid keys"):
        unset_setting("wheels")


def test_writes_are_locked_and_keep_the_workdir_setting(tmp_path):
    """Concurrent `set`s of different keys all land (read-modify-write under the lock), and the
    workdir stored by `infra workdir set` survives."""
    assert cli("workdir", "set", str(tmp_path), env=config_env()).returncode == 0
    values = {"pids_limit": "100", "train_uid": "2000", "train_gid": "2001", "base_os": "os:1", "torch_spec": "t==1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "runner", "config", "set", k, v],
            env={**os.environ, **config_env(), "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for k, v in values.items()
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * len(procs)
    stored = json.loads(config_file().read_text())
    assert stored["workdir"] == str(tmp_path.resolve())
    assert {k: str(v) for k, v in stored["node"].items()} == values
    assert not [p for p in config_file().parent.iterdir() if p.name.endswith(".tmp")]


def test_the_lock_is_held_across_read_modify_write():
    import fcntl

    from runner import settings

    folder = settings.config_dir()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".config.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    done = threading.Event()
    writer = threading.Thread(target=lambda: (set_setting("base_os", "x"), done.set()))
    writer.start()
    try:
        assert not done.wait(0.5)  # blocked on the lock this test holds
        assert not config_file().exists()
    finally:
        os.close(fd)
    writer.join(timeout=30)
    assert done.is_set() and json.loads(config_file().read_text())["node"] == {"base_os": "x"}


# --- shell completion -------------------------------------------------------------------------------------


def test_show_and_install_completion(tmp_path):
    shown = cli("--show-completion", "bash")
    assert shown.returncode == 0 and "_infra_completion()" in shown.stdout and "complete -o" in shown.stdout
    env = {"HOME": str(tmp_path), "SHELL": "/bin/bash"}
    installed = cli("--install-completion", "bash", env=env)
    assert installed.returncode == 0, installed.stderr
    assert "bash completion installed" in installed.stdout
    assert "infra" in (tmp_path / ".bashrc").read_text()


def test_completion_completes_commands_and_setting_keys():
    def complete(words: str, cword: int) -> list[str]:
        env = {"_INFRA_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        result = cli(env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    assert complete("infra con", 1) == ["config"]
    assert complete("infra config u", 2) == ["unset"]
    assert complete("infra config get torch", 3) == ["torch_spec"]


def test_help_stays_fast():
    """`infra --help` with completion on: no more than the library imports it had (measured best of 3)."""
    best = min(_timed([sys.executable, "-m", "runner", "--help"]) for _ in range(3))
    assert best < 1.5, f"infra --help took {best:.2f} s"
    imported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, runner.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'docker', 'pandas', 'matplotlib', 'numpy')))",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert imported.stdout.strip() == "[]"


def _timed(cmd: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(cmd, capture_output=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=Path(REPO))
    return time.monotonic() - start
