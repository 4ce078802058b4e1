"""Untrusted output as lines: split with a length cap in linear time, and made safe to print.

Container and training output is written by code infra does not control. `LineSplitter` turns a
stream of byte chunks into lines of at most `LINE_LIMIT` bytes: a longer line keeps its first
`LINE_LIMIT` bytes and ends with a visible marker saying how many bytes were dropped. The work is
linear in the bytes fed and the memory is one capped line plus one chunk, however the chunks fall
(a 40 MiB line without a newline costs what 40 MiB of short lines cost). `terminal_safe` removes
what a terminal would interpret (escape sequences, control characters, bidi overrides) so printed
output cannot move the cursor, retitle the window or hide text. Standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Callable

LINE_LIMIT = 64 << 10  # bytes of one line kept; the rest is dropped and counted


def truncation_marker(dropped: int) -> bytes:
    return f" … [infra: line truncated, {dropped} bytes dropped]".encode()


class LineSplitter:
    """Feed byte chunks, get `emit(line)` for each complete line (bytes, without the newline).

    Lines longer than `limit` bytes are cut to `limit` bytes plus `truncation_marker`. `close()`
    emits a last line that had no newline. Lines are split on b"\\n" only; a trailing b"\\r" stays.
    """

    def __init__(self, emit: Callable[[bytes], None], limit: int = LINE_LIMIT):
        self.emit = emit
        self.limit = limit
        self._partial = bytearray()  # the start of the current line, at most `limit` bytes
        self._dropped = 0  # bytes of the current line beyond `limit`

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        pieces = chunk.split(b"\n")
        last = pieces.pop()
        for i, piece in enumerate(pieces):
            if i == 0 and (self._partial or self._dropped):
                self._add(piece)
                self._end_line()
            elif len(piece) > self.limit:
                self.emit(piece[: self.limit] + truncation_marker(len(piece) - self.limit))
            else:
                self.emit(piece)
        if last:
            self._add(last)

    def close(self) -> None:
        """Emit the line still open (output that did not end with a newline)."""
        if self._partial or self._dropped:
            self._end_line()

    def _add(self, piece: bytes) -> None:
        room = self.limit - len(self._partial)
        if len(piece) <= room:
            self._partial += piece
        else:
            if room > 0:
                self._partial += piece[:room]
            self._dropped += len(piece) - max(room, 0)

    def _end_line(self) -> None:
        line = bytes(self._partial)
        if self._dropped:
            line += truncation_marker(self._dropped)
        self._partial.clear()
        self._dropped = 0
        self.emit(line)


# SGR (colours, bold) first so it can be kept; then every other escape sequence, the C0/C1 controls
# except TAB, and the bidirectional overrides that reorder what is displayed.
_SGR = r"\x1b\[[0-9;:]*m"
_UNSAFE = re.compile(
    rf"(?P<sgr>{_SGR})"
    r"|\x1b\[[0-?]*[ -/]*[@-~]?"  # CSI (cursor moves, erase, modes), also unterminated
    r"|\x1b[\]PX^_][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # OSC (titles, hyperlinks, clipboard), DCS, APC…
    r"|\x1b[ -/]*[0-~]?"  # the other escapes (charset switches, resets)
    r"|\x9b[0-?]*[ -/]*[@-~]?"  # 8-bit CSI
    r"|[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]"
)


def terminal_safe(text: str, keep_colors: bool = False, shown: bool = False) -> str:
    """`text` without escape sequences, control characters (TAB excepted) and bidi overrides.

    `keep_colors` keeps SGR sequences (colours, bold), which cannot move the cursor or change the
    terminal's state beyond the text attributes. `shown` writes what is removed as inert escapes
    (`\\x1b]0;title\\x07`) instead of dropping it: for messages, where a name that differs from
    what it looks like must look different.
    """
    if not _UNSAFE.search(text):
        return text

    def repl(m: re.Match) -> str:
        if keep_colors and m.group("sgr"):
            return m.group(0)
        return m.group(0).encode("unicode_escape").decode("ascii") if shown else ""

    return _UNSAFE.sub(repl, text)


def display_line(line: bytes, keep_colors: bool = False) -> str:
    """One captured line as printable text: UTF-8 (invalid bytes replaced), no CR, terminal-safe."""
    return terminal_safe(line.decode("utf-8", errors="replace").rstrip("\r"), keep_colors)
