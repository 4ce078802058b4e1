"""The CLI's one output boundary (runner/cli/output.py): no escape sequence from an untrusted file
reaches the terminal through a message, an error included; what was there is shown as inert text.

Real files: a SQLite database whose source name carries a terminal title + clear-screen sequence, a
CSV whose header carries one; the CLI runs in-process as `infra` would.
"""

from __future__ import annotations

import json

from runner.cli.output import printable
from tests.conftest import make_db
from tests.helpers import cli

HOSTILE = "EVIL\x1b]0;pwned\x07\x1b[2J\u202e"
SHOWN = "EVIL\\x1b]0;pwned\\x07\\x1b[2J\\u202e"


def test_printable_shows_controls_as_inert_escapes_and_keeps_line_breaks():
    assert printable(f"a {HOSTILE}\nb\tc\r") == f"a {SHOWN}\nb\tc\\r"
    assert printable("plain text, ünïcode") == "plain text, ünïcode"


def test_a_hostile_source_name_in_a_validate_error_is_shown_inert(tmp_path):
    db = make_db(tmp_path / "x.db", source=HOSTILE)
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"name": "x", "data": {"db": str(db), "dataset": "EVIL"}, "model": {"name": "linear"}}))

    result = cli("validate", str(plan), workdir=tmp_path)
    assert result.returncode == 2
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr and "\u202e" not in result.stderr
    assert f"data.dataset: no dataset 'EVIL' in x.db; available: {SHOWN}" in result.stderr

    as_json = cli("validate", str(plan), "--json", workdir=tmp_path)
    assert "\x1b" not in as_json.stdout + as_json.stderr  # JSON escapes it; the value is kept exactly
    assert json.loads(as_json.stdout)["errors"][0]["message"].endswith(f"available: {HOSTILE}")


def test_a_hostile_csv_header_in_an_import_error_is_shown_inert(tmp_path):
    (tmp_path / "h.csv").write_text("mutant,score\x1b]0;pwned\x07\nA1C,0.5\n")
    result = cli("data", "import", "h.csv", "--db", "o.db", "--source", "s1", "--template", "ACDEFG", cwd=tmp_path)
    assert result.returncode == 2
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr
    assert "the header has: mutant, score\\x1b]0;pwned\\x07" in result.stderr


def test_log_records_pass_the_same_boundary():
    """A warning may quote a name a plugin chose (a setuid file it left) or a server's error text: the
    handler the CLI installs formats through `printable` too (review of issue 23)."""
    import logging

    from runner.cli import _root
    from runner.cli.output import SafeLogFormatter

    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "removed bits from %s", (HOSTILE,), None)
    assert SafeLogFormatter("%(levelname)s %(message)s").format(record) == f"WARNING removed bits from {SHOWN}"

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    try:
        _root(version=False, debug=False, verbose=0)  # what every `infra` command runs first
        assert [type(h.formatter) for h in root.handlers] == [SafeLogFormatter]
    finally:
        root.handlers[:] = saved
