"""Fixtures and helpers for end-to-end tests: a non-root run user, the CPU base image, demo workdirs."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import DEFAULT_SIGINT

REPO = Path(__file__).resolve().parent.parent
TEST_USER = "infra-e2e"
BASE_ENV = {"INFRA_BASE_OS": "infra-os:bookworm", "INFRA_TORCH_SPEC": "torch==2.13.0"}


@pytest.fixture(scope="session")
def run_user():
    """(uid, gid, name) of a non-root user in the docker group; the current user when not root."""
    if os.geteuid() != 0:
        return os.getuid(), os.getgid(), pwd.getpwuid(os.getuid()).pw_name
    from filelock import FileLock

    # CI runs the two tiers side by side: each session sets the user up, and useradd/usermod refuse to
    # run while the other holds /etc/passwd's lock ("cannot lock /etc/passwd; try again later").
    with FileLock(f"{tempfile.gettempdir()}/{TEST_USER}-setup.lock"):
        try:
            entry = pwd.getpwnam(TEST_USER)
        except KeyError:
            subprocess.run(["useradd", "--create-home", "--groups", "docker", TEST_USER], check=True)
            entry = pwd.getpwnam(TEST_USER)
        # useradd leaves the account locked ("!"), which sshd refuses even for key logins; "*" means
        # "no password" without locking.
        subprocess.run(["usermod", "-p", "*", TEST_USER], check=True)
    probe = subprocess.run(
        ["runuser", "-u", TEST_USER, "--", sys.executable, "-c", "import runner, docker"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.fail(
            f"user {TEST_USER} cannot import infra with {sys.executable} (make the interpreter's folders "
            f"traversable, e.g. chmod o+x /root): {probe.stderr.strip()[-300:]}"
        )
    return entry.pw_uid, entry.pw_gid, TEST_USER


@pytest.fixture(scope="session")
def base_image(docker_client):
    """The CPU base image for this checkout (built once per session when missing)."""
    from runner.images import builds

    ref = builds.ensure_base_image(
        docker_client, base_image=BASE_ENV["INFRA_BASE_OS"], torch_spec=BASE_ENV["INFRA_TORCH_SPEC"]
    )
    return ref


@pytest.fixture
def workdir(run_user):
    """A workdir from the template with the demo database, owned by the run user.

    It lives directly under /tmp: pytest's own tmp folders are private to root, which the run user
    could not enter.
    """
    from runner.data.importer import build_demo_db

    uid, gid, _ = run_user
    top = Path(tempfile.mkdtemp(prefix="infra-e2e-", dir="/tmp"))
    work = top / "work"
    shutil.copytree(REPO / "plugins_template", work)
    build_demo_db(work / "data" / "blat_ecolx.db")
    for path in [top, work, *work.rglob("*")]:
        os.chown(path, uid, gid)
    yield work
    shutil.rmtree(top, ignore_errors=True)


def chown_to(run_user, *paths: Path) -> None:
    for path in paths:
        os.chown(path, run_user[0], run_user[1])


def infra_as(run_user, *args, workdir: Path, background=False, timeout=900):
    uid, _, name = run_user
    env = {**os.environ, **BASE_ENV, "INFRA_WORKDIR": str(workdir), "PYTHONUNBUFFERED": "1"}
    env.pop("XDG_CONFIG_HOME", None)
    cmd = [sys.executable, "-c", "from runner.cli import main; main()", *args]
    if background:  # a test may Ctrl-C it: SIGINT must not stay ignored (DEFAULT_SIGINT says why)
        cmd = [*DEFAULT_SIGINT, *cmd]
    if os.geteuid() == 0 and uid != 0:
        env["HOME"] = pwd.getpwnam(name).pw_dir
        cmd = ["runuser", "-u", name, "--", *cmd]
    if background:
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=workdir, start_new_session=True
        )
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=workdir)


def labelled_containers(client, workdir: Path | None = None) -> list:
    """infra's containers; with `workdir` only that workdir's (other tests may share the engine)."""
    label = "infra.experiment_id"
    if workdir is not None:
        from runner.run.spec import LABEL_WORKDIR, workdir_identity

        label = f"{LABEL_WORKDIR}={workdir_identity(workdir)}"
    return client.containers.list(all=True, filters={"label": label})


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_for_training(workdir: Path, epochs: int = 1, timeout: float = 300) -> Path:
    """The directory of the workdir's (only) demo experiment, once it has finished `epochs` epochs."""
    root = workdir / "experiments"
    exp_dir = wait_for(
        lambda: next(iter(root.glob("blat-demo-*")), None) if root.exists() else None,
        timeout,
        "the experiment directory",
    )
    wait_for(lambda: epoch_events(exp_dir) >= epochs, timeout, f"{epochs} epoch(s)")
    return exp_dir


# The gate model (tests/gate_model.py) instead of the demo's linear model: a run that a test must catch
# in the act is held until the test opens the gate, however fast the training is. 400 variants: the
# gate model has no closed-form start, and its epochs take a moment.
GATED_DEMO = ("--set", "data.limit=400", "--set", "train.max_epochs=3", "--set", "train.early_stopping_patience=0")


def gated(after_checkpoint: bool = True) -> tuple[str, ...]:
    """`--set` arguments that make the demo plan train the gate model: held after its first checkpoint
    (an epoch is in the log), or with `after_checkpoint=False` at its first step (no checkpoint yet)."""
    model = {"name": "gate", "params": {"after_checkpoint": after_checkpoint}}
    return (*GATED_DEMO, "--set", f"model={json.dumps(model)}")


def add_gate_model(workdir: Path, run_user) -> None:
    """The gate model as the workdir's plugin model/gate.py, owned by the run user.

    The template plus this file is one plugin image, built by whichever test needs it first."""
    shutil.copy(REPO / "tests" / "gate_model.py", workdir / "model" / "gate.py")
    chown_to(run_user, workdir / "model" / "gate.py")


def wait_for_gate(workdir: Path, timeout: float = 300) -> Path:
    """The directory of the workdir's (only) demo experiment, once the gate model holds its training."""
    root = workdir / "experiments"
    exp_dir = wait_for(
        lambda: next(iter(root.glob("blat-demo-*")), None) if root.exists() else None,
        timeout,
        "the experiment directory",
    )
    wait_for(lambda: (exp_dir / "metrics" / ".gate-waiting").exists(), timeout, "the training to wait at the gate")
    return exp_dir


def open_gate(exp_dir: Path, run_user) -> None:
    gate = exp_dir / "metrics" / ".gate-open"
    gate.touch()
    chown_to(run_user, gate)


def epoch_events(exp_dir: Path) -> int:
    try:
        lines = (exp_dir / "logs" / "events.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if json.loads(line).get("event") == "epoch")


@pytest.fixture(scope="session")
def sshd(run_user, tmp_path_factory):
    """A real sshd on 127.0.0.1 (own config and host key) that lets the run user in with a test key.

    Yields a function `ssh(command, input=None, background=False)` that runs COMMAND on the "node"
    as the run user through a real OpenSSH client.
    """
    if os.geteuid() != 0:
        pytest.skip("starting sshd needs root")
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd_bin).exists():
        pytest.fail("sshd is not installed: apt-get install -y openssh-server")
    folder = tmp_path_factory.mktemp("sshd")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "client_key")], check=True)
    uid, gid, name = run_user
    home = Path(pwd.getpwnam(name).pw_dir)
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text((folder / "client_key.pub").read_text())
    for path in (ssh_dir, ssh_dir / "authorized_keys"):
        os.chown(path, uid, gid)
    os.chmod(ssh_dir / "authorized_keys", 0o600)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    port = _free_port()
    config = folder / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\nPidFile {folder / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\nUsePAM no\n"
        "PermitRootLogin no\nStrictModes no\nLogLevel ERROR\n"
    )
    with open(folder / "sshd.log", "w") as log:
        proc = subprocess.Popen([sshd_bin, "-D", "-e", "-f", str(config)], stderr=log)
    base = [
        "ssh",
        "-i",
        str(folder / "client_key"),
        "-p",
        str(port),
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        f"{name}@127.0.0.1",
    ]

    def ssh(command: str, input: str | None = None, background: bool = False, timeout: float = 600):
        if background:
            return subprocess.Popen(
                [*base, command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        return subprocess.run([*base, command], input=input, capture_output=True, text=True, timeout=timeout)

    try:
        wait_for(
            lambda: ssh("true", timeout=10).returncode == 0 or proc.poll() is not None, 30, "sshd to accept logins"
        )
        if proc.poll() is not None:
            pytest.fail(f"sshd exited: {(folder / 'sshd.log').read_text()[-1000:]}")
        yield ssh
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def remote_infra(workdir: Path, args: str) -> str:
    """The command line the Master sends: node settings in the environment, infra via the interpreter.

    PYTHONPATH names this checkout: sshd hands the login a fresh environment, and the interpreter's
    own install of infra may be another checkout (an editable install elsewhere).
    """
    env = " ".join(f"{k}={v}" for k, v in {**BASE_ENV, "INFRA_WORKDIR": str(workdir), "PYTHONPATH": str(REPO)}.items())
    return f"env {env} {sys.executable} -m runner {args}"
