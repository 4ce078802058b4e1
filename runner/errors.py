"""The one exception family of infra, each class mapped to a documented exit code.

Library code raises these; only the CLI's error boundary (`runner.cli.main`) turns them into a
one-line message and an exit code. Messages name the file, key, image or container involved and say
what to do next.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_EXPERIMENT_FAILED = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3
EXIT_UNKNOWN_EXPERIMENT = 4
EXIT_INTERRUPTED = 130


def shorten(value: object, limit: int = 60, quote: bool = True) -> str:
    """`repr(value)` (or `str` without `quote`) cut to about `limit` characters, saying how long it
    was: a message stays one readable line when it quotes a 10,000-substitution mutant or a sequence."""
    text = repr(value) if quote else str(value)
    if len(text) <= limit:
        return text
    size = f"{len(value):,} characters" if isinstance(value, str | bytes) else f"{len(text):,} characters as text"
    return f"{text[: limit - 10]}…{text[-6:]} ({size})"


class InfraError(Exception):
    """Root of every error infra reports to a user."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
        self.document: dict = {}  # context a command attaches for its --json error document

    def __str__(self) -> str:
        return self.message

    def to_json(self) -> dict:
        """The one JSON document a `--json` command prints for this error."""
        error = {"type": type(self).__name__, "message": self.message, "exit_code": self.exit_code}
        if getattr(self, "log_tail", ""):
            error["log_tail"] = self.log_tail
        return {**self.document, "error": error}


class UsageError(InfraError):
    """Bad command-line input or configuration (exit 2)."""


@dataclass(frozen=True)
class PlanIssue:
    """One problem in a plan: the dotted key path (or '' for the document) and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def to_dict(self) -> dict:
        return {"path": self.path, "message": self.message}


class PlanError(InfraError):
    """A plan that does not validate; carries every issue found, not just the first (exit 2)."""

    def __init__(self, source: str, issues: list[PlanIssue]):
        self.source = source
        self.issues = list(issues)
        first = str(self.issues[0]) if self.issues else "invalid plan"
        more = f" (and {len(self.issues) - 1} more)" if len(self.issues) > 1 else ""
        super().__init__(f"{source}: {first}{more}")

    def to_json(self) -> dict:
        errors = [i.to_dict() for i in self.issues]
        doc = super().to_json()
        doc["error"]["errors"] = errors
        return {"valid": False, "source": self.source, "errors": errors, **doc}


class WorkdirError(UsageError):
    """No usable workdir where one is required (exit 2)."""


class DataError(InfraError):
    """Bad input data: a database, CSV or selection that cannot be used (exit 2)."""


class EnvironmentProblem(InfraError):
    """The node cannot do what was asked: Docker unreachable, GPU runtime missing, disk full (exit 3)."""

    exit_code = EXIT_ENVIRONMENT


class BuildError(EnvironmentProblem):
    """An image build failed; carries the failing step and the tail of the build log (exit 3)."""

    def __init__(self, message: str, step: str = "", log_tail: str = ""):
        super().__init__(message)
        self.step = step
        self.log_tail = log_tail


class ExperimentFailed(InfraError):
    """The experiment ran and failed: training or plugin code, container exited non-zero (exit 1)."""

    exit_code = EXIT_EXPERIMENT_FAILED

    def __init__(self, message: str, exit_status: int | None = None, log_tail: str = "", reason: str | None = None):
        super().__init__(message)
        self.exit_status = exit_status
        self.log_tail = log_tail
        self.reason = reason  # the training core's own one-line error, when it gave one

    def to_json(self) -> dict:
        doc = super().to_json()
        if self.reason:
            doc["error"]["reason"] = self.reason
        return doc


class TrainingDiverged(ExperimentFailed):
    """The training's loss, metrics or predictions became NaN or infinite (exit 1): the run is failed."""


class UnknownExperiment(InfraError):
    """No experiment with that id in the workdir (exit 4)."""

    exit_code = EXIT_UNKNOWN_EXPERIMENT


class Interrupted(InfraError):
    """The user interrupted; the experiment was stopped and marked cancelled (exit 130)."""

    exit_code = EXIT_INTERRUPTED
