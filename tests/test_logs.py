"""Experiment logs without an engine: capped lines, the head + rolling tail, reading and following."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runner import safefs
from runner.errors import UsageError
from runner.lines import LINE_LIMIT, LineSplitter, display_line, terminal_safe
from runner.run import logs
from tests.helpers import cli
from tests.test_experiments import make_exp

MIB = 1 << 20


def split_all(chunks, limit=LINE_LIMIT) -> list[bytes]:
    out: list[bytes] = []
    splitter = LineSplitter(out.append, limit)
    for chunk in chunks:
        splitter.feed(chunk)
        assert len(splitter._partial) <= limit  # memory: never more than one capped line
    splitter.close()
    return out


def reference_lines(data: bytes, limit: int) -> list[bytes]:
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return [
        ln if len(ln) <= limit else ln[:limit] + f" … [infra: line truncated, {len(ln) - limit} bytes dropped]".encode()
        for ln in lines
    ]


def test_splitter_is_independent_of_how_chunks_fall():
    rng = random.Random(7)
    data = b"".join(rng.choice([b"a" * rng.randrange(0, 40), b"\n", b"\n\n", b"b" * 300]) for _ in range(2000))
    expected = reference_lines(data, 100)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(data)), 50))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        assert split_all(chunks, limit=100) == expected


def test_endless_line_is_cut_with_a_marker_and_the_next_line_survives():
    chunks = [b"start"] + [b"x" * 16384] * 2560 + [b"\nafter\n", b"tail without newline"]
    lines = split_all(chunks)
    dropped = 5 + 16384 * 2560 - LINE_LIMIT
    assert (
        lines[0] == b"start" + b"x" * (LINE_LIMIT - 5) + f" … [infra: line truncated, {dropped} bytes dropped]".encode()
    )
    assert lines[1:] == [b"after", b"tail without newline"]


def test_terminal_safe_removes_what_a_terminal_would_act_on():
    hostile = "ok\x1b]0;owned\x07 \x1b[2J\x1b[1;1Hx\rhidden\x9b2K\x1b(0\x08\x00\u202eevil\tend"
    assert terminal_safe(hostile) == "ok xhiddenevil\tend"
    assert terminal_safe("\x1b[1;31mred\x1b[0m") == "red"
    assert terminal_safe("\x1b[1;31mred\x1b[0m", keep_colors=True) == "\x1b[1;31mred\x1b[0m"
    assert terminal_safe("plain text ünïcode") == "plain text ünïcode"
    assert display_line(b"crlf\r") == "crlf" and display_line(b"\xff bad") == "\ufffd bad"


@pytest.mark.parametrize(
    ("value", "expected"), [("", 100 * MIB), ("100M", 100 * MIB), ("2g", 2 << 30), ("1MiB", MIB), ("3145728", 3 * MIB)]
)
def test_log_limit_setting(monkeypatch, value, expected):
    monkeypatch.setenv("INFRA_LOG_LIMIT", value)
    assert logs.log_limit() == expected


@pytest.mark.parametrize("value", ["0", "512K", "lots", "-5M", "1.5G"])
def test_log_limit_refuses_what_it_cannot_use(monkeypatch, value):
    monkeypatch.setenv("INFRA_LOG_LIMIT", value)
    with pytest.raises(UsageError, match=r"INFRA_LOG_LIMIT=.*: use a size of at least 1M, like 100M or 2G"):
        logs.log_limit()


def test_docker_log_config_holds_at_most_twice_the_limit():
    assert logs.docker_log_config(100 * MIB) == {"type": "json-file", "config": {"max-size": "51200k", "max-file": "4"}}
    assert logs.docker_log_config(MIB)["config"]["max-size"] == "512k"


def numbered(n: int, width: int = 60) -> list[bytes]:
    return [f"line {i:07d} ".encode().ljust(width, b"x") for i in range(n)]


def kept_files(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in root.iterdir() if p.name.startswith("container.log")}


def read_all(root: Path, tail=None) -> list[str]:
    out: list[str] = []
    logs.read_log(root, out.append, tail=tail)
    return out


def test_small_log_is_one_file_and_reads_back_whole(tmp_path):
    lines = numbered(100)
    logs.capture(tmp_path, [b"\n".join(lines)], limit=MIB)  # no final newline: still a line
    assert kept_files(tmp_path) == {"container.log": 100 * 61}
    assert read_all(tmp_path) == [ln.decode() for ln in lines]
    assert read_all(tmp_path, tail=3) == [ln.decode() for ln in lines[-3:]]


def test_over_the_limit_keeps_head_and_tail_and_marks_the_gap(tmp_path):
    lines = numbered(200_000)  # 12.2 MB into a 1 MiB limit
    data = b"\n".join(lines) + b"\n"
    logs.capture(tmp_path, [data[i : i + 16384] for i in range(0, len(data), 16384)], limit=MIB)
    files = kept_files(tmp_path)
    assert sum(files.values()) <= MIB and files["container.log"] <= MIB // 2
    assert len(files) == 3  # the head and two tail parts
    got = read_all(tmp_path)
    markers = [i for i, line in enumerate(got) if line.startswith("[infra:")]
    assert len(markers) == 1
    head, tail = got[: markers[0]], got[markers[0] + 1 :]
    assert head == [ln.decode() for ln in lines[: len(head)]]
    assert tail == [ln.decode() for ln in lines[-len(tail) :]]
    dropped = int(got[markers[0]].split()[1])
    assert dropped == len(data) - sum(len(x) + 1 for x in head + tail)
    for n in (1, 2, len(tail), len(tail) + 1, len(tail) + 2, len(got), len(got) + 10):
        assert read_all(tmp_path, tail=n) == got[-n:], n


def test_tail_parts_without_a_gap_read_seamlessly(tmp_path):
    lines = numbered(10_000)  # 610 KB: the head and one tail part, nothing dropped
    logs.capture(tmp_path, [b"\n".join(lines) + b"\n"], limit=MIB)
    assert len(kept_files(tmp_path)) == 2
    assert read_all(tmp_path) == [ln.decode() for ln in lines]
    assert read_all(tmp_path, tail=9_000) == [ln.decode() for ln in lines[-9_000:]]


def test_a_new_live_capture_replaces_the_old_log(tmp_path):
    logs.capture(tmp_path, [b"\n".join(numbered(50_000))], limit=MIB)
    logs.capture(tmp_path, [b"fresh\n"], limit=MIB)
    assert kept_files(tmp_path) == {"container.log": 6}


def test_staged_save_replaces_the_log_only_when_complete(tmp_path):
    logs.capture(tmp_path, [b"old\n"], limit=MIB)

    def failing():
        yield b"\n".join(numbered(50_000))
        raise ConnectionError("engine went away")

    with pytest.raises(ConnectionError):
        logs.capture(tmp_path, failing(), staged=True, limit=MIB)
    assert sorted(os.listdir(tmp_path)) == ["container.log"] and read_all(tmp_path) == ["old"]
    logs.capture(tmp_path, [b"\n".join(numbered(50_000))], staged=True, limit=MIB)
    assert len(kept_files(tmp_path)) == 3 and not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_reading_never_follows_a_planted_link(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("not yours\n")
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "container.log").symlink_to(secret)
    with pytest.raises(safefs.Tampered, match="is a symbolic link"):
        read_all(exp)
    (exp / "container.log").unlink()
    (exp / "container.log").write_text("head\n")
    (exp / "container.log.0000000000000005").symlink_to(secret)
    with pytest.raises(safefs.Tampered):
        read_all(exp)
    # and the writer replaces a planted link instead of writing through it
    logs.capture(exp, [b"new\n"], limit=MIB)
    assert secret.read_text() == "not yours\n" and not (exp / "container.log").is_symlink()


def test_tail_text_is_terminal_safe_and_bounded(tmp_path):
    exp = make_exp(tmp_path)
    logs.capture(exp.root, [b"a\n\x1b]0;title\x07b\n" + b"c" * (5 * LINE_LIMIT) + b"\n"], limit=MIB)
    text = logs.tail_text(exp, 2)
    assert text.startswith("b\n" + "c" * LINE_LIMIT) and text.endswith("bytes dropped]") and "\x1b" not in text
    assert logs.tail_text(make_exp(tmp_path / "other"), 5) == ""


def test_follower_sees_every_kept_byte_or_a_gap_while_the_writer_rotates(tmp_path):
    exit_file = tmp_path / ".exit_code"
    lines = numbered(150_000)
    total = sum(len(ln) + 1 for ln in lines)

    def writer():
        chunks = (b"\n".join(lines[i : i + 500]) + b"\n" for i in range(0, len(lines), 500))
        logs.capture(tmp_path, chunks, limit=MIB)
        exit_file.write_text("0\n")

    seen: list[str] = []
    thread = threading.Thread(target=writer)
    thread.start()
    logs.follow_file_log(tmp_path, exit_file, seen.append, poll_s=0.01)
    thread.join()
    text_lines = [s for s in seen if not s.startswith("[infra:")]
    gaps = sum(int(s.split()[1]) for s in seen if s.startswith("[infra:"))
    assert sum(len(s) + 1 for s in text_lines) + gaps == total  # nothing lost without saying so
    positions = [int(s.split()[1]) for s in text_lines]
    assert positions == sorted(positions) and positions[0] == 0 and positions[-1] == len(lines) - 1


def test_follower_starts_at_the_tail_and_stops_at_the_exit_file(tmp_path):
    exit_file = tmp_path / ".exit_code"
    logs.capture(tmp_path, [b"\n".join(numbered(20)) + b"\n"], limit=MIB)
    exit_file.write_text("0\n")
    seen: list[str] = []
    logs.follow_file_log(tmp_path, exit_file, seen.append, tail=2)
    assert [s[:12] for s in seen] == ["line 0000018", "line 0000019"]


def test_local_wrapper_captures_into_the_bounded_log(tmp_path):
    exit_file = tmp_path / ".exit_code"
    child = (
        "import sys\n"
        "sys.stdout.write('x' * (3 << 20))\n"  # one 3 MiB line without a newline, then a flood
        "sys.stdout.write('\\n' + ('y' * 99 + '\\n') * 40000)\n"
        "sys.stdout.flush()\n"
        "sys.stderr.write('the end\\n')\n"
        "sys.exit(3)\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner.run.local_wrapper",
            "--log-dir",
            str(tmp_path),
            str(exit_file),
            sys.executable,
            "-c",
            child,
        ],
        env={**os.environ, "INFRA_LOG_LIMIT": "1M"},
        timeout=120,
    )
    assert done.returncode == 3 and exit_file.read_text() == "3\n"
    assert sum(kept_files(tmp_path).values()) <= MIB
    got = read_all(tmp_path)
    assert got[0].endswith(f"[infra: line truncated, {(3 << 20) - LINE_LIMIT} bytes dropped]")
    assert got[-1] == "the end" and any(g.startswith("[infra:") and "dropped here" in g for g in got)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["logs", "blat-0123456789", "--tail", "0"], "infra: error: --tail 0: use a number of lines of at least 1"),
        (["logs", "blat-0123456789", "--tail", "-3"], "infra: error: --tail -3: use a number of lines of at least 1"),
        (
            ["stop", "blat-0123456789", "--timeout", "-1"],
            "infra: error: --timeout -1: use a number of seconds of at least 0",
        ),
        (["ls", "--since", "1000000d"], "infra: error: --since '1000000d': reaches back before year 1"),
    ],
)
def test_argument_holes_exit_2_with_one_line(tmp_path, args, message):
    make_exp(tmp_path, state="succeeded")
    result = cli(*args, "--workdir", str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert result.stdout == ""


def test_logs_command_prints_kept_log_safely(tmp_path):
    exp = make_exp(tmp_path, state="succeeded")
    logs.capture(exp.root, [b"one\n\x1b]52;c;cm0gLXJmIH4=\x07two\x1b[31m\n"], limit=MIB)
    result = cli("logs", exp.id, "--workdir", str(tmp_path))
    assert result.returncode == 0 and result.stdout == "one\ntwo\n"
    result = cli("logs", exp.id, "--tail", "1", "--workdir", str(tmp_path))
    assert result.stdout == "two\n"


def test_engine_stream_order_drops_replays_keeps_small_inversions():
    from runner.engine import _InOrder

    def frame(ns: int, text: str) -> bytes:
        return f"2026-11-28T23:00:00.{ns:09d}Z {text}".encode()

    order = _InOrder()
    ms = 1_000_000
    stream = [
        frame(100 * ms, "a"),
        frame(200 * ms, "b1"),
        frame(200 * ms, "b2"),  # two parts of one long line share a stamp
        frame(195 * ms, "stderr"),  # stamped a little earlier by the other copier: kept
        frame(100 * ms, "a"),  # a rotation replays the file: dropped up to what was kept
        frame(200 * ms, "b1"),
        frame(200 * ms, "b2"),
        frame(300 * ms, "c"),
    ]
    assert [t for t in map(order.keep, stream) if t is not None] == [b"a", b"b1", b"b2", b"stderr", b"c"]
    assert order.since().endswith(".300000000")
    order.replay()  # the catch-up read from `since` starts with the newest message again
    assert [order.keep(frame(300 * ms, "c")), order.keep(frame(300 * ms, "c2"))] == [None, b"c2"]
    trimmed = b"2026-11-28T23:00:01.5Z d"  # RFC 3339 drops trailing zeros
    assert order.keep(trimmed) == b"d" and order.last % 10**9 == 500_000_000


class _RefusingApi:
    """The engine's answer to a logs request for a container its runner is removing."""

    def __init__(self, status: int):
        self.status = status

    def _url(self, template: str, *args) -> str:
        return template.format(*args)

    def _get(self, url: str, **kwargs):
        import requests

        response = requests.Response()
        response.status_code, response.url = self.status, url
        response.reason = "Conflict" if self.status == 409 else "Server Error"
        return response

    def _raise_for_status(self, response) -> None:
        import docker.errors

        raise docker.errors.APIError("can not get logs from container which is dead or marked for removal",
                                     response=response)  # fmt: skip


def test_a_container_marked_for_removal_has_no_more_logs_and_other_engine_errors_still_raise():
    # seen in CI: three `infra run` of one plan; the owner removed the container while an attached run
    # read its last lines, and the 409 ended the attached run with a traceback (exit 1)
    import docker.errors

    from runner.engine import _log_request

    def container(status: int):
        return type("C", (), {"id": "c0ffee", "client": type("K", (), {"api": _RefusingApi(status)})()})()

    assert list(_log_request(container(409), {"follow": 0}, tty=False, frames=True)) == []
    with pytest.raises(docker.errors.APIError):
        list(_log_request(container(500), {"follow": 0}, tty=False, frames=True))
