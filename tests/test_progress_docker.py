"""What a person sees from `infra run`: a real run in a container under a pseudo-terminal, rendered by
a terminal emulator (pyte), then the same kind of run piped, `--quiet` and `-v`.

The terminal's screen is checked at every chunk the command wrote (the live line is transient: the
build step and the spinner are only there while they happen) and at the end (what stays).
"""

from __future__ import annotations

import fcntl
import os
import pty
import pwd
import re
import struct
import subprocess
import sys
import termios
import uuid
from pathlib import Path

import pytest

from tests.e2e import BASE_ENV, infra_as

pyte = pytest.importorskip("pyte", reason="pyte renders the terminal (pip install -e '.[dev]')")

pytestmark = [pytest.mark.docker, pytest.mark.slow]
COLUMNS, ROWS = 120, 60
# 1,000 of the demo's variants: what is shown does not depend on the size, and the linear model's ridge
# start on all 4,997 was most of each run
PLAN = ["run", "plans/demo.json", "--set", "train.max_epochs=2", "--set", "data.limit=1000"]
EPOCH_LINE = r"epoch {n}/2  train_loss \d+\.\d{{4}}  val_loss \d+\.\d{{4}}  val_spearman -?\d+\.\d{{4}}"
NOISE = ("Tip", "litlogger", "litmodels", "{'", "GPU available")


def infra_in_terminal(run_user, *args, workdir: Path) -> tuple[int, list[str], set[str]]:
    """Run `infra ARGS` on a pseudo-terminal; return its exit code, the final screen and every line
    that was ever on the screen."""
    uid, _, name = run_user
    env = {**os.environ, **BASE_ENV, "INFRA_WORKDIR": str(workdir), "TERM": "xterm-256color"}
    env.pop("XDG_CONFIG_HOME", None)
    env.pop("NO_COLOR", None)
    cmd = [sys.executable, "-c", "from runner.cli import main; main()", *args]
    if os.geteuid() == 0 and uid != 0:
        env["HOME"] = pwd.getpwnam(name).pw_dir
        cmd = ["runuser", "-u", name, "--", *cmd]
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    proc = subprocess.Popen(cmd, stdin=secondary, stdout=secondary, stderr=secondary, env=env, cwd=workdir)
    os.close(secondary)
    screen = pyte.Screen(COLUMNS, ROWS)
    stream = pyte.ByteStream(screen)
    seen: set[str] = set()
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the command and everything it started closed the terminal
            break
        if not chunk:
            break
        stream.feed(chunk)
        seen.update(line.rstrip() for line in screen.display)
    os.close(primary)
    code = proc.wait(timeout=900)
    return code, [line.rstrip() for line in screen.display if line.strip()], seen


def unique_plugin(workdir: Path, run_user) -> None:
    """A plugin file no other test has: the plugin image must be built (the build phase is shown)."""
    path = workdir / "model" / f"progress_{uuid.uuid4().hex[:8]}.py"
    path.write_text("# a plugin file only this test has, so that its plugin image is built here\n")
    os.chown(path, run_user[0], run_user[1])


@pytest.fixture
def built_images(docker_client):
    """Plugin images the test built, removed afterwards (other tests share the engine)."""
    tags: list[str] = []
    yield tags
    for tag in tags:
        try:
            docker_client.images.remove(tag, force=True)
        except Exception as exc:  # an image still in use by another test's container stays
            print(f"could not remove {tag}: {exc}")


def test_terminal_view_shows_build_epochs_and_summary(base_image, workdir, run_user, built_images):
    unique_plugin(workdir, run_user)
    code, screen, seen = infra_in_terminal(run_user, *PLAN, workdir=workdir)
    text = "\n".join(screen)
    assert code == 0, text
    build = re.search(r"build: the plugins image (infra-plugins:\w+)", text)
    assert build, text
    built_images.append(build.group(1))
    # the live line showed the build step in progress (transient: seen while it ran)
    assert any(re.search(r"building infra-plugins:\w+: (FROM|COPY|RUN|LABEL|USER|ENV|WORKDIR)", s) for s in seen)
    for n in (1, 2):
        assert len([line for line in screen if re.match(EPOCH_LINE.format(n=n), line)]) == 1, text
    assert re.search(r"┃ metric\s+┃\s+val ┃\s+test ┃", text), text
    assert re.search(r"│ spearman\s+│\s+\d\.\d{4} │\s+\d\.\d{4} │", text), text
    assert re.search(r"experiment blat-demo-\w+ succeeded: test spearman", text), text
    for noise in NOISE:
        assert noise not in text, (noise, text)
    assert "validating the plan" not in text and "building infra-plugins:" not in text  # the live line is gone
    exp_dir = Path(re.search(r"\((/tmp/\S+/experiments/blat-demo-\w+)\)", text.replace("\n", "")).group(1))
    # the core's own output (the log, what -v shows): compact epoch lines, Lightning's notices, no adverts
    container_log = (exp_dir / "container.log").read_text()
    assert re.search(EPOCH_LINE.format(n=2), container_log) and "GPU available" in container_log, container_log
    for advert in ("Tip", "litlogger", "litmodels", "{'"):
        assert advert not in container_log, (advert, container_log)
    build_log = (exp_dir / "build.log").read_text()
    # the base image's build comes first when this run had to make it too
    assert f"\ninfra: building the plugins image {build.group(1)}\n" in "\n" + build_log, build_log[-2000:]
    assert "Step 1/" in build_log and f"infra: built {build.group(1)} in " in build_log


def test_piped_quiet_and_verbose_output(base_image, workdir, run_user):
    piped = infra_as(run_user, *PLAN, workdir=workdir)
    assert piped.returncode == 0, piped.stderr
    lines = piped.stderr.splitlines()
    assert lines[0] == "validate: plan 'blat-demo' ok (plans/demo.json)"
    # the template's plugin image: built by whichever test ran first
    image = r"image: infra-plugins:\w+ (\(reused\)|is built when the experiment starts)"
    assert any(re.fullmatch(image, line) for line in lines), lines
    assert any(re.fullmatch(r"data: 1000 variants \(train \d+, val \d+, test \d+\)", line) for line in lines)
    for n in (1, 2):
        assert len([line for line in lines if re.match(EPOCH_LINE.format(n=n), line)]) == 1, lines
    assert any(re.fullmatch(r"test: spearman \d\.\d{4}  pearson .*", line) for line in lines), lines
    assert not any(noise in piped.stderr for noise in NOISE), piped.stderr
    assert "\x1b" not in piped.stderr  # no terminal codes in a pipe
    assert piped.stdout == ""

    quiet = infra_as(run_user, *PLAN, "--rerun", "--quiet", workdir=workdir)
    assert quiet.returncode == 0, quiet.stderr
    assert len(quiet.stderr.splitlines()) == 1, quiet.stderr
    assert re.fullmatch(r"experiment blat-demo-\w+ succeeded: test spearman \d\.\d{4}.*\)\n", quiet.stderr)

    verbose = infra_as(run_user, *PLAN, "--rerun", "-v", workdir=workdir)
    assert verbose.returncode == 0, verbose.stderr
    # the raw training output, as the core prints it: its log lines and Lightning's notices
    assert re.search(r"INFO runner\.core\.experiment: " + EPOCH_LINE.format(n=2), verbose.stderr), verbose.stderr
    assert "GPU available: False" in verbose.stderr
    assert "Tip" not in verbose.stderr and "litlogger" not in verbose.stderr
