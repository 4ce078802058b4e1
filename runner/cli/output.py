"""How the CLI talks: human text on stderr, exactly one JSON document on stdout with `--json`.

This is the output boundary: every line of plain human text (errors included) goes through `say` or
`echo`, which turn what a terminal would interpret (`runner.lines.terminal_safe`: escape sequences,
control characters, bidi overrides) into visible, inert escapes (`\\x1b[2J`), line by line. Messages quote database source names, CSV
headers, assay ids, plugin output and paths, all of which can come from untrusted files. JSON
documents need no such step: `json.dumps` escapes every control character. Rich tables and live
displays render text that their builders made terminal-safe the same way (`runner.cli.progress`).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from runner.lines import terminal_safe


def printable(text: str) -> str:
    """`text` with each line made terminal-safe, what it removes shown as inert escapes (so a source
    name `EVIL\\x1b[2J` does not print as `EVIL`); line breaks kept."""
    return "\n".join(terminal_safe(line, shown=True) for line in str(text).split("\n"))


class SafeLogFormatter(logging.Formatter):
    """Log records on the terminal pass the same boundary: a warning may quote a file name a plugin
    chose or a server's error text."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def say(message: str) -> None:
    """One line (or several) of human text on stderr."""
    print(printable(message), file=sys.stderr, flush=True)


def echo(text: str, nl: bool = True, data: bool = False) -> None:
    """Human text on stdout (tables, ids, paths) made terminal-safe. `data` (CSV on `-`) is written as
    it is into a pipe or file, where a program reads it, and made terminal-safe only on a terminal."""
    text = str(text) if data and not sys.stdout.isatty() else printable(text)
    sys.stdout.write(text + ("\n" if nl else ""))
    sys.stdout.flush()


def emit_json(document: Any) -> None:
    """The one JSON document of a `--json` command, on stdout."""
    sys.stdout.write(json.dumps(document, indent=None, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def emit_event(event: dict) -> None:
    """One line of an `--events` JSON-lines stream, on stdout."""
    sys.stdout.write(json.dumps(event, default=str) + "\n")
    sys.stdout.flush()


def print_table(headers: list[str], rows: list[list[str]], right: frozenset[str] = frozenset(), fold=False) -> None:
    """A rich table on a terminal, aligned plain text otherwise (a pipe, a file). Columns named in
    `right` are right-aligned on a terminal; `fold` wraps long cells there instead of cutting them."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, header_style="bold")
        for h in headers:
            table.add_column(h, justify="right" if h in right else "left", overflow="fold" if fold else "ellipsis")
        for row in rows:
            table.add_row(*(Text(c) for c in row))  # Text: a cell's "[link=…]" is text, not rich markup
        Console().print(table)
        return
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
