"""The image path played as an attacker: a workdir owner trying to read the node through links, special
files, odd names and plugin output, and builds that should leave nothing behind (issue 14, items 6,
7, 9).

Tests without a marker read workdirs and run the CLI in subprocesses (`--dry-run`, `--backend local`);
tests marked `docker` build and run against the real engine and remove every image and container
they made (found by tag, label, or parent chain from this checkout's base image).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from runner import engine
from runner.images import builds, wheels
from runner.images.context import ContextError
from runner.run import hardening
from runner.run.spec import workdir_identity
from runner.workdir.plugins import DiscoveryOutputError, check_document
from tests.conftest import make_db

REPO = Path(__file__).resolve().parent.parent
SECRET = "TOP-SECRET-do-not-copy"


def infra(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "INFRA_WORKDIR"}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "runner", *args], capture_output=True, text=True, env=full, timeout=timeout
    )


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "root-only" / "secret"
    path.parent.mkdir()
    path.write_text(SECRET)
    path.chmod(0o600)
    return path


@pytest.fixture
def wd(tmp_path) -> Path:
    work = tmp_path / "wd"
    (work / "model").mkdir(parents=True)
    (work / "model" / "tiny.py").write_text("X = 1\n")
    (work / "metrics").mkdir()
    return work


def members(entries) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(builds.context_tar_bytes(entries))) as tar:
        return {m.name: m for m in tar.getmembers()}


# --- 6: links never followed --------------------------------------------------------------------------


def test_link_out_of_the_workdir_is_exit_2_naming_link_and_target(wd, secret):
    (wd / "model" / "leak.txt").symlink_to(secret)
    result = infra("build", "--dry-run", "--workdir", str(wd))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"infra: error: {wd}/model/leak.txt: symbolic link to {secret}, outside the plugin folders of {wd} "
        "(model/ embed/ metrics/ vocab/); infra does not follow links out of there: replace the link with a "
        "copy of the file"
    )
    assert SECRET not in result.stdout + result.stderr


def test_link_chain_leaving_names_where_it_resolves(wd, secret):
    (wd / "model" / "a.py").symlink_to("b.py")  # inside, but b.py leaves: a.py resolves outside
    (wd / "model" / "b.py").symlink_to(os.path.relpath(secret, wd / "model"))
    with pytest.raises(ContextError) as err:
        builds.plugin_context_entries(wd)
    assert err.value.exit_code == 2
    assert str(err.value).startswith(f"{wd}/model/a.py: symbolic link to b.py (resolves to {secret}), outside")


@pytest.mark.parametrize("where", ["model", "requirements.txt", ".dockerignore", "model/sub"])
def test_every_workdir_read_refuses_links_out(wd, secret, where):
    """Plugin folder itself, requirements.txt, .dockerignore, a nested folder: none is followed."""
    if where == "model":
        shutil.rmtree(wd / "model")
        (wd / "model").symlink_to(secret.parent, target_is_directory=True)
    elif where == "model/sub":
        (wd / "model" / "sub").symlink_to(secret.parent, target_is_directory=True)
    else:
        (wd / where).symlink_to(secret)
    with pytest.raises(ContextError, match=r"symbolic link to .*infra does not follow links out of there") as err:
        builds.plan_plugin_build(wd, "infra-base:x", "sha256:x")
    assert err.value.path == f"{wd}/{where}"


def test_link_into_the_workdir_but_not_into_the_image_is_refused(wd):
    (wd / "notes.txt").write_text("not copied into the image\n")
    (wd / "model" / "notes.py").symlink_to("../notes.txt")
    with pytest.raises(ContextError, match=r"model/notes.py: symbolic link to \.\./notes.txt, outside the plugin"):
        builds.plugin_context_entries(wd)


def test_links_inside_the_plugin_folders_are_kept_as_links_and_hashed_as_links(wd):
    (wd / "model" / "alias.py").symlink_to("tiny.py")
    (wd / "metrics" / "shared").symlink_to(wd / "model", target_is_directory=True)  # absolute: stored relative
    (wd / "model" / ".#tiny.py").symlink_to("me@host.1234:1700000000")  # an editor lock: dangling, harmless
    tar = members(builds.plugin_context_entries(wd))
    assert tar["workdir/model/alias.py"].issym() and tar["workdir/model/alias.py"].linkname == "tiny.py"
    assert tar["workdir/metrics/shared"].issym() and tar["workdir/metrics/shared"].linkname == "../model"
    assert tar["workdir/model/.#tiny.py"].linkname == "me@host.1234:1700000000"
    # The hash covers the (normalised) link text, not what it points to: the target is its own entry.
    entry = next(e for e in builds.plugin_context_entries(wd) if e.arcname == "workdir/model/alias.py")
    assert entry.digest() == "link:tiny.py"
    before = builds.plan_plugin_build(wd, "b", "sha256:x").content_hash
    (wd / "model" / "other.py").write_text("X = 1\n")
    (wd / "model" / "alias.py").unlink()
    (wd / "model" / "alias.py").symlink_to("other.py")
    (wd / "model" / "tiny.py").rename(wd / "model" / "moved.py")
    (wd / "model" / "tiny.py").write_text("X = 1\n")
    assert builds.plan_plugin_build(wd, "b", "sha256:x").content_hash != before


def test_a_file_swapped_for_a_link_after_listing_is_not_read(wd, secret):
    spec = builds.plan_plugin_build(wd, "b", "sha256:x")
    (wd / "model" / "tiny.py").rename(wd / "kept.py")  # still exists: its inode cannot be reused below
    (wd / "model" / "tiny.py").symlink_to(secret)
    with pytest.raises(ContextError, match=r"model/tiny.py: became a symbolic link while the context was read"):
        builds.context_tar_bytes(spec.entries)
    (wd / "model" / "tiny.py").unlink()
    (wd / "model" / "new.py").write_text("X = 2\n")
    os.replace(wd / "model" / "new.py", wd / "model" / "tiny.py")  # another file (inode): also refused
    with pytest.raises(ContextError, match=r"model/tiny.py: changed while the build context was read; run again"):
        builds.context_tar_bytes(spec.entries)


# --- 6: special files refused, never opened ---------------------------------------------------------------


def test_fifo_in_a_plugin_folder_is_refused_without_blocking(wd):
    os.mkfifo(wd / "model" / "pipe.py")
    result = infra("build", "--dry-run", "--workdir", str(wd), timeout=60)  # reading it would block forever
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"infra: error: {wd}/model/pipe.py: is a FIFO; infra takes only files, folders and links from a workdir "
        "and never opens anything else: remove it (or list it in the workdir's .dockerignore)"
    )


@pytest.mark.parametrize("name", ["requirements.txt", ".dockerignore"])
def test_fifo_as_a_workdir_file_is_refused(wd, name):
    os.mkfifo(wd / name)
    result = infra("build", "--dry-run", "--workdir", str(wd), timeout=60)
    assert result.returncode == 2
    assert f"{wd}/{name}: is a FIFO;" in result.stderr


def test_socket_is_refused_and_an_ignored_fifo_is_left_alone(wd):
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(wd / "metrics" / "s.sock"))
        with pytest.raises(ContextError, match=r"metrics/s.sock: is a socket;"):
            builds.plugin_context_entries(wd)
        (wd / ".dockerignore").write_text("**/*.sock\n")
        os.mkfifo(wd / "model" / "pipe")
        (wd / ".dockerignore").write_text("**/*.sock\nmodel/pipe\n")
        names = [e.arcname for e in builds.plugin_context_entries(wd)]
        assert "workdir/model/tiny.py" in names and not any(n.endswith(("s.sock", "pipe")) for n in names)
    finally:
        sock.close()


# --- 9: names and files that are not UTF-8 ------------------------------------------------------------------


@pytest.mark.core
def test_non_utf8_file_name_is_exit_2_with_the_bytes_escaped(wd, tmp_path):
    bad = os.path.join(os.fsencode(wd / "model"), b"caf\xe9.py")
    Path(os.fsdecode(bad)).write_text("X = 3\n")
    expected = (
        f"infra: error: {wd}/model/caf\\xe9.py: file name is not valid UTF-8 and cannot enter an image; rename it "
        "(or list it in the workdir's .dockerignore)"
    )
    built = infra("build", "--dry-run", "--workdir", str(wd))
    assert (built.returncode, built.stderr.strip()) == (2, expected)
    db = make_db(tmp_path / "mini.db")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"name": "atk", "data": {"db": str(db)}, "model": {"name": "linear"}}))
    ran = infra("run", str(plan), "--backend", "local", "--workdir", str(wd))
    assert (ran.returncode, ran.stderr.strip().splitlines()[-1]) == (2, expected)
    assert "Traceback" not in built.stderr + ran.stderr
    assert not (wd / "experiments").exists() or not any((wd / "experiments").iterdir())


def test_non_utf8_dockerignore_and_requirements_are_exit_2(wd):
    (wd / ".dockerignore").write_bytes(b"# caf\xe9\n")
    result = infra("build", "--dry-run", "--workdir", str(wd))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"infra: error: {wd}/.dockerignore: not valid UTF-8 (byte 0xe9 at offset 5); save it as UTF-8"
    )
    (wd / ".dockerignore").unlink()
    (wd / "requirements.txt").write_bytes(b"numpy\n\xff\n")
    with pytest.raises(ContextError, match=r"requirements.txt: not valid UTF-8 \(byte 0xff at offset 6\)"):
        builds.plugin_context_entries(wd)


def test_non_utf8_name_left_out_by_dockerignore_is_fine(wd):
    Path(os.fsdecode(os.path.join(os.fsencode(wd / "model"), b"\xff.bak"))).write_text("")
    (wd / ".dockerignore").write_text("**/*.bak\n")
    assert "workdir/model/tiny.py" in [e.arcname for e in builds.plugin_context_entries(wd)]


# --- 9: wheels only for real requirements -------------------------------------------------------------------


def fake_wheel(folder: Path, name: str, version: str = "1.0", requires: tuple[str, ...] = ()) -> Path:
    """A small, installable pure-Python wheel: one module `<name>.py` with VALUE = '<name> <version>'."""
    dist = f"{name}-{version}"
    files = {
        f"{name}.py": f"VALUE = {name + ' ' + version!r}\n",
        f"{dist}.dist-info/METADATA": "Metadata-Version: 2.1\n"
        f"Name: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = "\n".join(record) + "\n"
    out = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return out


@pytest.fixture
def wheelhouse(tmp_path) -> Path:
    house = tmp_path / "wheelhouse"
    house.mkdir()
    fake_wheel(house, "infra_atk_top", requires=("infra-atk-dep>=1", "infra_atk_opt; extra == 'x'"))
    fake_wheel(house, "infra_atk_dep")
    fake_wheel(house, "infra_atk_opt")
    fake_wheel(house, "unrelated")
    return house


def wheel_names(entries) -> list[str]:
    return sorted(e.arcname for e in entries if e.arcname.startswith("wheels/"))  # .offline included


def test_comment_only_requirements_bring_no_wheels(wd, wheelhouse):
    shutil.copy(REPO / "plugins_template" / "requirements.txt", wd / "requirements.txt")
    assert wheels.has_requirements((wd / "requirements.txt").read_text()) is False
    assert wheel_names(builds.plugin_context_entries(wd, wheelhouse)) == []


def test_real_requirements_bring_only_the_wheels_they_can_need(wd, wheelhouse):
    (wd / "requirements.txt").write_text("# plugins need\nInfra.Atk-Top==1.0  # pinned\n")
    assert wheel_names(builds.plugin_context_entries(wd, wheelhouse)) == [
        "wheels/.offline",  # a wheelhouse means offline, even for a name it lacks
        "wheels/infra_atk_dep-1.0-py3-none-any.whl",
        "wheels/infra_atk_opt-1.0-py3-none-any.whl",  # extras and markers are not evaluated: a superset
        "wheels/infra_atk_top-1.0-py3-none-any.whl",
    ]
    (wd / "requirements.txt").write_text("--pre\ninfra_atk_top\n")  # an option: all, as before
    assert len(wheel_names(builds.plugin_context_entries(wd, wheelhouse))) == 5
    (wd / "requirements.txt").write_text("not-in-the-wheelhouse\n")
    assert wheel_names(builds.plugin_context_entries(wd, wheelhouse)) == ["wheels/.offline"]


# --- 7: dry run never builds -------------------------------------------------------------------------------


def test_dry_run_without_an_engine_prints_the_plan(wd):
    result = infra(
        "build", "--dry-run", "--json", "--workdir", str(wd), env={"DOCKER_HOST": "unix:///nonexistent.sock"}
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["base"]["exists"] is None and doc["base"]["tag"].startswith("infra-base:")
    assert doc["plugins"]["tag"] is None and "workdir/model/tiny.py" in doc["plugins"]["context"]
    assert "whether images exist is unknown" in result.stderr


# --- 7: the discovery channel -------------------------------------------------------------------------------

PRINTS = "import os, sys\nprint('hello from a plugin')\nos.write(1, b'garbage on fd 1\\n')\nsys.stdout.flush()\n"
CHANNEL_WRITER = (
    "import os\n"
    "for fd in range(3, 64):\n"
    "    try:\n"
    "        os.write(fd, b']not json[')\n"
    "    except OSError:\n"
    "        pass\n"
)


@pytest.mark.core
def test_plugin_printing_at_import_does_not_break_list(wd):
    (wd / "model" / "noisy.py").write_text(PRINTS)
    result = infra("plugins", "list", "--json", "--backend", "local", "--workdir", str(wd), timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {k: v for k, v in next(r for r in rows if r["name"] == "linear").items() if k != "source_file"} == {
        "kind": "model",
        "name": "linear",
        "builtin": True,
        "open_params": False,
        "params": [
            {"name": "l2", "type": "float", "default": 1.0, "required": False},
            {"name": "lr_scale", "type": "float", "default": 10.0, "required": False},
            {"name": "init", "type": "str", "default": "ridge", "required": False},
        ],
    }


@pytest.mark.core
def test_garbage_written_to_the_channel_is_a_clear_exit_1(wd):
    (wd / "model" / "writer.py").write_text(CHANNEL_WRITER)
    result = infra("plugins", "check", "--backend", "local", "--workdir", str(wd), timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"infra: error: plugin discovery for workdir {wd} in a local subprocess returned a malformed document "
        "(not JSON: Expecting value at byte 0); a plugin may write to the discovery channel or end the process: "
        f"run 'infra plugins check --backend local --workdir {wd}' and read what the plugins print"
    )
    checked = infra("plugins", "check", "--json", "--backend", "local", "--workdir", str(wd), timeout=300)
    assert checked.returncode == 1
    doc = json.loads(checked.stdout)
    assert doc["ok"] is False and doc["error"] == "DiscoveryOutputError" and str(wd) in doc["message"]


@pytest.mark.core
def test_plugin_ending_the_process_early_is_a_clear_exit_1(wd):
    (wd / "model" / "quitter.py").write_text("import os\nos._exit(0)\n")
    result = infra("plugins", "list", "--backend", "local", "--workdir", str(wd), timeout=300)
    assert result.returncode == 1
    assert f"plugin discovery for workdir {wd} in a local subprocess returned a malformed document (empty)" in (
        result.stderr
    )


@pytest.mark.parametrize(
    ("document", "why"),
    [
        (b"", "empty"),
        (b'{"kind": "model"}', "a JSON dict, not a list"),
        (b"[1]", "item 0 is not an object of kind, name, source_file, builtin, params, open_params"),
        (
            b'[{"kind": "model", "name": "x", "source_file": "/w/a.py", "builtin": false, "params": [], "open_params": false, "extra": 1}]',
            "item 0 is not",
        ),
        (
            b'[{"kind": "model", "name": "\\u001b[2J", "source_file": "", "builtin": false, "params": [], "open_params": false}]',
            "item 0: name is not a string",
        ),
        (
            b'[{"kind": "model", "name": "x", "source_file": "", "builtin": "no", "params": [], "open_params": false}]',
            "item 0: builtin or open_params is not true or false",
        ),
        (b"\xff\xfe", "not JSON: not UTF-8"),
        (b"[1,", "not JSON: Expecting value at byte 3"),
        (b"[" + b" " * (9 << 20) + b"]", "more than 8388608 bytes"),
    ],
)
def test_discovery_document_is_checked_as_untrusted(document, why):
    with pytest.raises(DiscoveryOutputError) as err:
        check_document(document, Path("/w"), "image x")
    assert err.value.exit_code == 1
    assert err.value.message.startswith(
        f"plugin discovery for workdir /w in image x returned a malformed document ({why}"
    )


# --- hardening shared by trainings and discovery -------------------------------------------------------------


def test_unprivileged_user_never_0():
    assert hardening.unprivileged_user({}, euid=0) == (10001, 10001)
    assert hardening.unprivileged_user({"SUDO_UID": "1234", "SUDO_GID": "99"}, euid=0) == (1234, 99)
    assert hardening.unprivileged_user({"SUDO_UID": "0"}, euid=0) == (10001, 10001)
    assert hardening.unprivileged_user({"INFRA_TRAIN_UID": "2000", "INFRA_TRAIN_GID": "3000"}, euid=0) == (2000, 3000)
    with pytest.raises(Exception, match=r"INFRA_TRAIN_UID='0': containers run as an unprivileged user") as err:
        hardening.unprivileged_user({"INFRA_TRAIN_UID": "0"}, euid=0)
    assert err.value.exit_code == 2
    assert hardening.unprivileged_user({}, euid=1000) == (os.getuid(), os.getgid())
    with pytest.raises(Exception, match="never run as uid 0"):
        hardening.security_args(0, 0)


def test_discovery_containers_get_the_training_hardening(wd, monkeypatch):
    monkeypatch.setenv("INFRA_TRAIN_UID", "4321")
    monkeypatch.setenv("INFRA_TRAIN_GID", "4321")
    monkeypatch.delenv("SUDO_UID", raising=False)
    from dataclasses import replace

    from runner.run.backends import backend_for
    from runner.run.jobs import discovery_job
    from runner.workdir.plugins import MAX_DOCUMENT_BYTES

    job = discovery_job(wd, {"infra.purpose": "plugin-discovery"}, "infra-plugins-x", 300).with_image("img", None)
    spec = backend_for("docker").spec(replace(job, log_limit=2 * MAX_DOCUMENT_BYTES))
    args = engine.container_args(
        spec.image, list(spec.command), **{k: v for k, v in spec.engine_kwargs().items() if k != "command"}
    )
    uid = "4321:4321" if os.geteuid() == 0 else f"{os.getuid()}:{os.getgid()}"
    assert args["user"] == uid
    assert (args["cap_drop"], args["security_opt"], args["pids_limit"]) == (["ALL"], ["no-new-privileges"], 4096)
    assert args["network_mode"] == "none" and args["read_only"] is True and args["privileged"] is False
    assert args["tmpfs"] == {"/tmp": "rw,nosuid,nodev,size=1g,mode=1777"}
    assert args["volumes"] == {}  # the plugins are the image's own copies: nothing of the host is mounted
    assert args["command"] == ["python", "-m", "runner.core.plugins", "/workdir"]
    # the engine keeps at most twice the document's limit: the document comes last and is small
    assert args["log_config"] == {"type": "json-file", "config": {"max-size": "8192k", "max-file": "4"}}
    assert args["labels"]["infra.purpose"] == "plugin-discovery" and args["labels"][
        "infra.workdir"
    ] == workdir_identity(wd)


# --- against the real engine ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(docker_client):
    if not engine.image_exists(docker_client, builds.CPU_BASE_ARGS["BASE_IMAGE"]):
        pytest.fail("infra-os:bookworm missing: run 'bash scripts/make-base-os-image.sh' (and make-wheelhouse.sh)")
    return builds.ensure_base_image(
        docker_client, base_image=builds.CPU_BASE_ARGS["BASE_IMAGE"], torch_spec=builds.CPU_BASE_ARGS["TORCH_SPEC"]
    )


@pytest.fixture
def made(docker_client, base):
    """Tags a test makes, removed afterwards with the containers it labelled and the untagged step
    images its builds left on this checkout's base (the requirements stage's cache)."""
    before = {i.id for i in docker_client.images.list(all=True)}
    tags: list[str] = []
    yield tags
    for container in engine.find_containers(docker_client, {"infra.test": "attack"}):
        engine.remove_container(container)
    for tag in tags:
        engine.remove_image(docker_client, tag, force=True)
    left = [i for i in docker_client.images.list(all=True) if i.id not in before and not i.tags]
    for image in sorted(left, key=lambda i: i.attrs["Created"], reverse=True):
        if descends_from(docker_client, image.id, base.id):
            with contextlib.suppress(Exception):  # still a parent of someone else's image: keep it
                docker_client.api.remove_image(image.id, noprune=True)


def descends_from(client, image_id: str, ancestor: str) -> bool:
    while image_id:
        if image_id == ancestor:
            return True
        try:
            image_id = client.api.inspect_image(image_id).get("Parent") or ""
        except Exception:  # removed meanwhile
            return False
    return False


def in_image(client, tag: str, code: str) -> tuple[int, str]:
    container = engine.run_container(
        client, tag, ["python", "-c", code], labels={"infra.test": "attack"}, user="10001:10001"
    )
    try:
        return engine.wait(container, timeout=120), engine.container_output(container)
    finally:
        engine.remove_container(container)


def base_env(base) -> dict:
    return {"INFRA_BASE_IMAGE": base.tag}


@pytest.mark.docker
def test_docker_link_inside_is_a_link_in_the_image_and_a_link_out_builds_nothing(docker_client, base, wd, secret, made):
    (wd / "model" / "alias.py").symlink_to("tiny.py")
    ref = builds.ensure_plugin_image(docker_client, wd, base.tag)
    made.append(ref.tag)
    code, out = in_image(
        docker_client,
        ref.tag,
        "import os; print(os.readlink('/workdir/model/alias.py'), open('/workdir/model/alias.py').read().strip())",
    )
    assert (code, out.strip()) == (0, "tiny.py X = 1")
    (wd / "model" / "leak.txt").symlink_to(secret)
    before = {i.id for i in docker_client.images.list(all=True)}
    result = infra("build", "--workdir", str(wd), env=base_env(base))
    assert result.returncode == 2 and f"{wd}/model/leak.txt: symbolic link to {secret}" in result.stderr
    assert [
        i
        for i in docker_client.images.list(all=True)
        if i.id not in before and descends_from(docker_client, i.id, base.id)
    ] == []


@pytest.mark.docker
def test_docker_template_plugin_image_carries_no_wheelhouse(docker_client, base, tmp_path, made):
    work = tmp_path / "template"
    shutil.copytree(REPO / "plugins_template", work, ignore=shutil.ignore_patterns("data", "experiments"))
    (work / "model" / "_stamp.py").write_text(f"S = {time.time_ns()}\n")
    house = builds.default_wheelhouse(builds.source_root())
    spec = builds.plan_plugin_build(work, base.tag, base.id, house)
    assert [e for e in spec.entries if e.arcname.startswith("wheels/")] == []
    ref = builds.build(docker_client, spec)
    made.append(ref.tag)
    grown = docker_client.api.inspect_image(ref.tag)["Size"] - docker_client.api.inspect_image(base.tag)["Size"]
    print(f"template plugin image: +{grown / 1e6:.2f} MB over the base, built in {ref.seconds:.2f} s")
    assert grown < 5e6
    code, out = in_image(
        docker_client,
        ref.tag,
        "import os; print(os.path.exists('/tmp/infra-plugins'), sorted(os.listdir('/opt/infra-plugins')))",
    )
    assert (code, out.strip()) == (0, "False ['bin', 'site-packages']")


@pytest.mark.docker
def test_docker_requirements_install_without_wheels_in_the_image(docker_client, base, wd, wheelhouse, made):
    (wd / "requirements.txt").write_text("infra_atk_top==1.0\n")
    ref = builds.ensure_plugin_image(docker_client, wd, base.tag, wheelhouse=wheelhouse)
    made.append(ref.tag)
    code, out = in_image(
        docker_client,
        ref.tag,
        "import glob, infra_atk_top, infra_atk_dep; print(infra_atk_top.VALUE, infra_atk_top.__file__, "
        "[w for d in ('/tmp', '/opt', '/workdir', '/root') for w in glob.glob(d + '/**/*.whl', recursive=True)])",
    )
    assert (code, out.strip()) == (0, "infra_atk_top 1.0 /opt/infra-plugins/site-packages/infra_atk_top.py []")
    labels = engine.image_labels(docker_client, ref.tag)
    assert labels["infra.kind"] == "plugins" and labels["infra.base_image"] == base.id


@pytest.mark.docker
def test_docker_failed_build_leaves_no_image_behind(docker_client, base, wd, wheelhouse):
    (wd / "requirements.txt").write_text("infra_atk_top==1.0\ninfra-atk-missing==9\n")
    before = {i.id for i in docker_client.images.list(all=True)}
    result = infra("build", "--workdir", str(wd), env={**base_env(base), "INFRA_WHEELHOUSE": str(wheelhouse)})
    assert result.returncode == 3
    assert "infra: error: building image infra-plugins:" in result.stderr
    # the step's number, out of the Dockerfile's steps and one LABEL step per infra.* label
    assert re.search(r"failed at 'Step 6/\d+ : RUN set -eu;", result.stderr), result.stderr[-2000:]
    assert "': the step exited with code 1 (log tail below)" in result.stderr
    assert "No matching distribution found for infra-atk-missing==9" in result.stderr
    left = [i for i in docker_client.images.list(all=True) if i.id not in before]
    ours = [i.id for i in left if descends_from(docker_client, i.id, base.id)]
    assert ours == []
    assert (
        docker_client.images.list(filters={"label": f"infra.content_hash={base.content_hash}", "dangling": True}) == []
    )


@pytest.mark.docker
def test_docker_dry_run_never_builds_a_missing_base(docker_client, wd):
    env = {"INFRA_BASE_OS": "infra-os:bookworm", "INFRA_TORCH_SPEC": f"torch>=2.2,!={time.time_ns()}"}
    result = infra("build", "--dry-run", "--json", "--workdir", str(wd), env=env)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["base"]["exists"], doc["base"]["would_build"], doc["base"]["id"]) == (False, True, None)
    assert doc["plugins"]["tag"] is None and doc["plugins"]["would_build"] is True
    assert not engine.image_exists(docker_client, doc["base"]["tag"])
    assert docker_client.images.list(filters={"label": f"infra.content_hash={doc['base']['content_hash']}"}) == []
    assert "Step 1/" not in result.stderr
    text = infra("build", "--dry-run", "--workdir", str(wd), env=env)
    assert text.returncode == 0 and text.stdout.startswith(f"base: {doc['base']['tag']}: missing; would build")


PROBE = """
import os
from runner.core.metrics import register_metric
status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
try:
    open("/var/tmp/x", "w")
    writable = "yes"
except OSError:
    writable = "no"
pids = "?"
for path in ("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"):
    if os.path.exists(path):
        pids = open(path).read().strip()
nets = "-".join(sorted(os.listdir("/sys/class/net")))
name = (f"probe_uid{os.getuid()}_gid{os.getgid()}_cap{status['CapEff'].strip()}_nnp{status['NoNewPrivs'].strip()}"
        f"_pids{pids}_net{nets}_rootwrite{writable}")
register_metric(name)(lambda y_true, y_pred: 0.0)
print("noise on stdout at import")
os.write(1, b"garbage on fd 1")
"""


@pytest.mark.docker
def test_docker_discovery_is_hardened_and_plugin_output_stays_out(docker_client, base, wd, made, monkeypatch):
    (wd / "metrics" / "probe.py").write_text(PROBE)
    monkeypatch.delenv("SUDO_UID", raising=False)
    ref = builds.ensure_plugin_image(docker_client, wd, base.tag)
    made.append(ref.tag)
    result = infra("plugins", "list", "--json", "--workdir", str(wd), env=base_env(base), timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    (probe,) = [r["name"] for r in rows if r["name"].startswith("probe_")]
    uid = "10001" if os.geteuid() == 0 else str(os.getuid())
    gid = "10001" if os.geteuid() == 0 else str(os.getgid())
    assert probe == f"probe_uid{uid}_gid{gid}_cap0000000000000000_nnp1_pids4096_netlo_rootwriteno"
    assert (
        engine.find_containers(
            docker_client, {"infra.purpose": "plugin-discovery", "infra.workdir": workdir_identity(wd)}
        )
        == []
    )


@pytest.mark.docker
def test_docker_garbage_on_the_channel_is_exit_1(docker_client, base, wd, made):
    (wd / "model" / "writer.py").write_text(CHANNEL_WRITER)
    made.append(builds.ensure_plugin_image(docker_client, wd, base.tag).tag)
    result = infra("plugins", "list", "--workdir", str(wd), env=base_env(base), timeout=300)
    assert result.returncode == 1
    assert (
        f"infra: error: plugin discovery for workdir {wd} in image {made[0]} returned a malformed document (not JSON: Expecting value at byte 0)"
        in (result.stderr)
    )


def test_bake_context_command_refuses_a_link_out_in_one_line(wd, secret, tmp_path):
    (wd / "model" / "leak.txt").symlink_to(secret)
    out = tmp_path / "ctx"
    result = subprocess.run(
        [sys.executable, "-m", "runner.images.builds", "context", str(wd), str(out)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"infra: error: {wd}/model/leak.txt: symbolic link to {secret}, outside")
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
