"""Experiment logs: capture container output into bounded files, read them back in bounded memory.

Layout, at the top of the experiment directory (host-only: never mounted into the container):

    container.log                     the head: the first half of the log limit
    container.log.<16-digit offset>   the tail: at most two parts of a quarter of the limit each,
                                      named by the byte offset in the output where they begin

Output up to the limit (`INFRA_LOG_LIMIT`, 100 MiB by default) is kept whole in `container.log`.
Beyond half of it the rest goes into tail parts; when a third part starts, the oldest is deleted, so
an experiment keeps its first and its last output and at most `limit` bytes. Readers put a line
`[infra: N bytes of output dropped here …]` where the middle is missing (the gap between two
parts' offsets), so `cat container.log*` shows what is kept and `infra logs` shows where the gap is.

Every line is capped at `runner.lines.LINE_LIMIT` bytes before it is written (a longer one keeps
its start and a truncation marker). Files are opened through `runner.safefs` (no links followed)
and read in blocks: `--tail N` scans backwards from the end, so no command holds a whole log.
The files keep the bytes the training printed; printing goes through `runner.lines.terminal_safe`.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from runner import safefs
from runner.lines import LINE_LIMIT, LineSplitter, display_line
from runner.run.records import CONTAINER_LOG

LOG_LIMIT_ENV = "INFRA_LOG_LIMIT"
BLOCK = 1 << 20  # bytes per read and per buffered write
_PART_RE = re.compile(re.escape(CONTAINER_LOG) + r"\.(\d{16})")
OnLine = Callable[[str], None]


def log_limit() -> int:
    """The per-experiment log limit in bytes (node setting `INFRA_LOG_LIMIT`: 100M, 1G, 500000; read
    now; default 100 MiB, at least 1 MiB)."""
    from runner.settings import node_settings

    return node_settings().log_limit_bytes


def docker_log_config(limit_bytes: int) -> dict:
    """The engine's json-file log options for a container whose experiment keeps `limit_bytes`.

    Four files of half the limit each: at most twice the limit on the engine's disk, which is about
    the limit's worth of output, since the JSON framing (~70 bytes a message, escapes) roughly
    doubles short lines. So a detached run saved from the engine keeps about as much of its end as a
    live capture keeps in total, and the engine's copy goes away with the container at finalisation.
    """
    half_kib = max(limit_bytes // 2 >> 10, 1)
    return {"type": "json-file", "config": {"max-size": f"{half_kib}k", "max-file": "4"}}


# --- writing ---------------------------------------------------------------------------------------


class LogWriter:
    """Writes capped lines as the kept log: the head, then rolling tail parts (see the module docstring).

    Live (the default), the files are written in place, so `infra logs --follow` and `tail -f` see
    them grow; earlier parts are removed first. `staged=True` writes under temporary names and
    `commit()` renames them into place, so a reader (or a second finaliser) never sees a half-saved
    log. Memory: one block of buffered output.
    """

    def __init__(self, root: Path, limit: int | None = None, staged: bool = False):
        self.root = Path(root)
        self.limit = log_limit() if limit is None else limit
        self.head_budget = self.limit // 2
        self.part_budget = (self.limit - self.head_budget) // 2
        self.token = secrets.token_hex(6) if staged else None
        self.offset = 0  # bytes of (capped) output so far, kept or dropped
        self.parts: list[int] = []  # offsets of the tail parts written and still kept
        self.size = 0  # bytes in the file being written
        self._buf = bytearray()
        if not staged:
            for start in _part_offsets(self.root):
                _unlink(self.root, _part_name(start))
        self._fd = safefs.open_truncate(self.root, self._name(None))

    def _name(self, start: int | None) -> str:
        final = CONTAINER_LOG if start is None else _part_name(start)
        return final if self.token is None else f".{final}.{self.token}.tmp"

    def write_line(self, line: bytes) -> None:
        n = len(line) + 1
        budget = self.part_budget if self.parts else self.head_budget
        if self.size + n > budget and (self.size or not self.parts):
            self._next_part()
        self._buf += line
        self._buf += b"\n"
        self.size += n
        self.offset += n
        if len(self._buf) >= BLOCK:
            self.flush()

    def _next_part(self) -> None:
        self.flush()
        os.close(self._fd)
        self._fd = safefs.open_truncate(self.root, self._name(self.offset))
        self.parts.append(self.offset)
        self.size = 0
        if len(self.parts) > 2:  # the new part exists before the oldest goes: followers never lose the thread
            _unlink(self.root, self._name(self.parts.pop(0)))

    def flush(self) -> None:
        view = memoryview(self._buf)
        while view:
            view = view[os.write(self._fd, view) :]
        view.release()
        self._buf.clear()

    def close(self) -> None:
        if self._fd is not None:
            try:
                self.flush()
            finally:
                os.close(self._fd)
                self._fd = None

    def commit(self) -> None:
        """Staged: put the new files in place of the old log (tail parts first, the head last)."""
        self.close()
        with safefs.open_dir(self.root) as dfd:
            for start in self.parts:
                os.replace(self._name(start), _part_name(start), src_dir_fd=dfd, dst_dir_fd=dfd)
            for start in set(_part_offsets(self.root)) - set(self.parts):
                _unlink(self.root, _part_name(start))
            os.replace(self._name(None), CONTAINER_LOG, src_dir_fd=dfd, dst_dir_fd=dfd)

    def discard(self) -> None:
        """Staged: remove the temporary files (a save that failed)."""
        self.close()
        for start in (None, *self.parts):
            _unlink(self.root, self._name(start))


def _part_name(start: int) -> str:
    return f"{CONTAINER_LOG}.{start:016d}"


def _part_offsets(root: Path) -> list[int]:
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(_PART_RE.fullmatch, names) if m)


def _unlink(root: Path, name: str) -> None:
    with safefs.open_dir(root) as dfd, contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dfd)


def capture(
    root: Path,
    chunks: Iterable[bytes],
    on_line: OnLine | None = None,
    *,
    staged: bool = False,
    limit: int | None = None,
    flush_each_chunk: bool = True,
) -> int:
    """Write output `chunks` as the kept log of the experiment at `root`; returns the output bytes seen.

    Each capped line also goes to `on_line` as terminal-safe text (colours kept). Memory: one capped
    line, one chunk and one write block, whatever the volume or the line lengths.
    """
    writer = LogWriter(root, limit, staged=staged)
    if on_line is None:
        emit = writer.write_line
    else:

        def emit(line: bytes) -> None:
            writer.write_line(line)
            on_line(display_line(line, keep_colors=True))

    splitter = LineSplitter(emit)
    seen = 0
    try:
        for chunk in chunks:
            seen += len(chunk)
            splitter.feed(chunk)
            if flush_each_chunk:
                writer.flush()
        splitter.close()
    except BaseException:
        if staged:
            writer.discard()
        else:
            writer.close()
        raise
    if staged:
        writer.commit()
    else:
        writer.close()
    return seen


def capture_container(exp, container, on_line: OnLine | None = None) -> None:
    """Follow a running container until it exits, writing its output as the experiment's log (live).

    For the foreground follower (`infra run`): replaces the log with the container's whole output,
    passes each line to `on_line`. Does not wait for the exit code or finalise.
    """
    from runner import engine

    capture(exp.root, engine.log_chunks(container, follow=True), on_line)


def save_container_log(exp, container) -> None:
    """Replace the experiment's log with the engine's log of an exited container (staged, then renamed).

    Streams through the same capture as a live run: bounded memory, the same limits.
    """
    from runner import engine

    capture(exp.root, engine.log_chunks(container, follow=False), staged=True, flush_each_chunk=False)


def capture_fd(root: Path, fd: int, limit: int | None = None) -> int:
    """Write what arrives on `fd` (a pipe from the training process) as the log, until end of file.

    The local backend's wrapper uses it; writes are flushed per read so followers see lines promptly.
    """

    def chunks() -> Iterator[bytes]:
        while data := os.read(fd, BLOCK):
            yield data

    return capture(root, chunks(), limit=limit)


# --- reading ---------------------------------------------------------------------------------------


@dataclass
class _Part:
    name: str
    start: int  # offset in the output where the file begins
    fh: object  # binary file object, opened without following links
    size: int  # bytes when opened


def _gap_line(dropped: int) -> bytes:
    return (
        f"[infra: {dropped} bytes of output dropped here: the log keeps the first and the last "
        f"part of the output ({LOG_LIMIT_ENV}, see docs/experiments.md)]"
    ).encode()


def _open_parts(root: Path, stack: contextlib.ExitStack) -> list[_Part]:
    """The kept log's files in output order, opened on `stack` (no links followed); files gone
    meanwhile are skipped (the gap line then covers them)."""
    parts = []
    for name, start in [(CONTAINER_LOG, 0), *((_part_name(s), s) for s in _part_offsets(root))]:
        try:
            fh = stack.enter_context(safefs.open_read(root, name))
        except FileNotFoundError:
            continue
        parts.append(_Part(name, start, fh, os.fstat(fh.fileno()).st_size))
    return parts


def _items(parts: list[_Part]) -> list[_Part | bytes]:
    """Files and, between two that are not contiguous, the gap line."""
    items: list[_Part | bytes] = []
    end = 0
    for part in parts:
        if part.start > end:
            items.append(_gap_line(part.start - end))
        items.append(part)
        end = part.start + part.size
    return items


def _lines_before_end(fh, size: int, wanted: int) -> tuple[int, int]:
    """(offset where the last `wanted` lines of fh[:size] begin, lines found, at most `wanted`).

    Reads backwards in blocks. A final newline ends the last line; it does not start another.
    """
    if size == 0 or wanted <= 0:
        return size, 0
    fh.seek(size - 1)
    end = size - 1 if fh.read(1) == b"\n" else size
    found, pos = 0, end
    while pos > 0:
        step = min(BLOCK, pos)
        pos -= step
        fh.seek(pos)
        block = fh.read(step)
        i = len(block)
        while (j := block.rfind(b"\n", 0, i)) >= 0:
            found += 1
            if found == wanted:
                return pos + j + 1, found
            i = j
    return 0, found + 1


def _tail_start(items: list[_Part | bytes], n: int | None) -> tuple[int, int]:
    """(item index, byte offset in it) where the last `n` lines begin (the start for None, the end for n < 1)."""
    if n is None:
        return 0, 0
    if n < 1:
        return len(items), 0
    wanted = n
    for index in range(len(items) - 1, -1, -1):
        item = items[index]
        if isinstance(item, bytes):
            wanted -= 1
            if wanted == 0:
                return index, 0
            continue
        offset, found = _lines_before_end(item.fh, item.size, wanted)
        wanted -= found
        if wanted == 0:
            return index, offset
    return 0, 0


def _read_part(part: _Part, offset: int, emit: Callable[[bytes], None], to_eof: bool = True) -> int:
    """Emit the lines of `part` from `offset` (to its end now, or to its size when opened); returns the end."""
    splitter = LineSplitter(emit, limit=LINE_LIMIT + 256)  # the writer's cap plus its marker
    part.fh.seek(offset)
    left = None if to_eof else part.size - offset
    while left is None or left > 0:
        block = part.fh.read(BLOCK if left is None else min(BLOCK, left))
        if not block:
            break
        offset += len(block)
        if left is not None:
            left -= len(block)
        splitter.feed(block)
    splitter.close()
    return offset


def read_log(root: Path, on_line: OnLine, tail: int | None = None, keep_colors: bool = False) -> None:
    """Pass the kept log's lines (the last `tail` when given) to `on_line` as terminal-safe text."""

    def emit(line: bytes) -> None:
        on_line(display_line(line, keep_colors))

    with contextlib.ExitStack() as stack:
        items = _items(_open_parts(root, stack))
        index, offset = _tail_start(items, tail)
        for item in items[index:]:
            if isinstance(item, bytes):
                emit(item)
            else:
                _read_part(item, offset, emit, to_eof=item is items[-1])
            offset = 0


def tail_text(exp, lines: int) -> str:
    """The last `lines` lines of the experiment's log as one terminal-safe string ('' when there is none).

    For error messages (ExperimentFailed.log_tail): bounded by `lines` capped lines.
    """
    out: list[str] = []
    with contextlib.suppress(OSError, safefs.Tampered):
        read_log(exp.root, out.append, tail=max(lines, 1))
    return "\n".join(out)


# --- following -------------------------------------------------------------------------------------


def follow_file_log(
    root: Path,
    exit_file: Path,
    on_line: OnLine,
    *,
    tail: int | None = None,
    on_idle: Callable[[], None] | None = None,
    keep_colors: bool = False,
    poll_s: float = 0.1,
) -> None:
    """Follow a log that another process writes (the local backend's) until `exit_file` appears.

    Starts at the beginning (or the last `tail` lines), passes each line to `on_line`, moves on to the
    next tail part when the writer does, and reports a gap when it fell behind by a whole part.
    `on_idle` runs between polls. The wrapper writes `exit_file` after the log, so nothing is missed.
    """

    def emit(line: bytes) -> None:
        on_line(display_line(line, keep_colors))

    with contextlib.ExitStack() as stack:
        current, offset = _first_to_follow(root, tail, emit, exit_file, on_idle, poll_s, stack)
        if current is None:
            return
        current.fh.seek(offset)
        splitter = LineSplitter(emit, limit=LINE_LIMIT + 256)
        while True:
            block = current.fh.read(BLOCK)
            if block:
                offset += len(block)
                splitter.feed(block)
                continue
            later = [s for s in _part_offsets(root) if s > current.start]
            if later:  # the writer moved on: this part is complete
                while block := current.fh.read(BLOCK):
                    offset += len(block)
                    splitter.feed(block)
                splitter.close()
                nxt = _open_next(root, later, stack)
                if nxt is None:
                    continue
                if nxt.start > current.start + offset:
                    emit(_gap_line(nxt.start - current.start - offset))
                current, offset = nxt, 0
                splitter = LineSplitter(emit, limit=LINE_LIMIT + 256)
                continue
            if exit_file.exists():
                while block := current.fh.read(BLOCK):
                    splitter.feed(block)
                splitter.close()
                if not [s for s in _part_offsets(root) if s > current.start]:
                    return
                continue
            if on_idle is not None:
                on_idle()
            time.sleep(poll_s)


def _open_next(root: Path, starts: list[int], stack: contextlib.ExitStack) -> _Part | None:
    for start in starts:
        try:
            fh = stack.enter_context(safefs.open_read(root, _part_name(start)))
        except FileNotFoundError:  # deleted by the writer meanwhile: the gap line says so
            continue
        return _Part(_part_name(start), start, fh, 0)
    return None


def _first_to_follow(root, tail, emit, exit_file, on_idle, poll_s, stack) -> tuple[_Part | None, int]:
    """Print the kept log up to the last part (its last `tail` lines) and return that part to follow."""
    while True:
        items = _items(_open_parts(root, stack))
        if items:
            index, offset = _tail_start(items, tail)
            if index == len(items):
                return items[-1], items[-1].size
            for item in items[index:-1]:
                if isinstance(item, bytes):
                    emit(item)
                else:
                    _read_part(item, offset, emit)
                offset = 0
            return items[-1], (offset if index == len(items) - 1 else 0)
        if exit_file.exists():
            return None, 0
        if on_idle is not None:
            on_idle()
        time.sleep(poll_s)


def follow_logs(exp, on_line: OnLine, follow: bool = False, tail: int | None = None, keep_colors: bool = False) -> None:
    """`infra logs`: the training output, live from its backend while it runs, else the kept log.

    `tail` (≥ 1) starts at the last `tail` lines; a live source is asked for both in one request,
    so no line is repeated or missed. Bounded memory whatever the log size.
    """
    from runner.run.backends import backend_of
    from runner.run.reconcile import reconcile

    record = reconcile(exp)
    if record.get("state") == "running":
        backend = backend_of(record)
        if backend.live_output(exp, record, on_line, follow=follow, tail=tail, keep_colors=keep_colors):
            return
    read_log(exp.root, on_line, tail=tail, keep_colors=keep_colors)


def shorten_log(exp, nbytes: int) -> None:
    """Give back the last `nbytes` of the kept log (a full disk), saying so at the cut."""
    fd = safefs.open_append(exp.root, exp.container_log.name)
    try:
        os.ftruncate(fd, max(os.fstat(fd).st_size - nbytes, 0))
        os.write(fd, b"\n[infra: the disk is full; the log is cut here]\n")
    except OSError as exc:
        import logging

        logging.getLogger(__name__).warning("could not shorten %s: %s", exp.container_log, exc)
    finally:
        os.close(fd)
