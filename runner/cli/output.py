"""How the CLI talks: human text on stderr, exactly one JSON document on stdout with `--json`."""

from __future__ import annotations

import json
import sys
from typing import Any


def say(message: str) -> None:
    """One line of human text on stderr."""
    print(message, file=sys.stderr, flush=True)


def emit_json(document: Any) -> None:
    """The one JSON document of a `--json` command, on stdout."""
    sys.stdout.write(json.dumps(document, indent=None, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def emit_event(event: dict) -> None:
    """One line of an `--events` JSON-lines stream, on stdout."""
    sys.stdout.write(json.dumps(event, default=str) + "\n")
    sys.stdout.flush()
