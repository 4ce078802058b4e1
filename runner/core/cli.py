"""`infra-train PLAN --exp-dir DIR [--workdir W] [--db PATH]`: the training core's entry point.

Exit codes: 0 success, 2 bad plan or data (one line on stderr), 1 any other failure (traceback on
stderr), 143 stopped by SIGTERM (last.ckpt saved; the host marks the run cancelled).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from runner.errors import EXIT_EXPERIMENT_FAILED, EXIT_USAGE, InfraError, PlanError, PlanIssue

log = logging.getLogger(__name__)

# Where Lightning's rank-zero notices are logged (its "GPU available", "Tip" and "stopped" lines).
LIGHTNING_NOTICE_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
ADVERT_MARKERS = ("💡 Tip", "litlogger", "litmodels", "Lightning AI", "lightning.ai")


class _NoAdverts(logging.Filter):
    """Drops third-party advertisements; warnings and errors always pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        message = record.getMessage()
        return not any(marker in message for marker in ADVERT_MARKERS)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infra-train",
        description="Train one experiment from a resolved plan into an experiment directory.",
        epilog="example: infra-train exp/config/plan.json --exp-dir exp --db data/dms.db --workdir /workdir",
    )
    parser.add_argument("plan", help="plan JSON file (usually <exp-dir>/config/plan.json), or - for stdin")
    parser.add_argument("--exp-dir", required=True, help="experiment directory to write (created if missing)")
    parser.add_argument(
        "--workdir", default=None, help="workdir with plugin folders (default: $INFRA_WORKDIR, /workdir)"
    )
    parser.add_argument("--db", default=None, help="SQLite database path; overrides data.db")
    parser.add_argument("--limit-batches", type=int, default=None, help=argparse.SUPPRESS)  # smoke tests
    return parser


def read_plan(source: str):
    """The typed `Plan` in a plan file (the canonical `config/plan.json` the host wrote), checked by
    the same rules as on the host: no repeated keys, NaN/Infinity or deep nesting, the schema."""
    from runner.plan.document import parse_json
    from runner.plan.issues import plan_from_document

    name = "<stdin>" if source == "-" else source
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanError(name, [PlanIssue("", f"cannot read the plan: {exc.strerror}")]) from None
    return plan_from_document(parse_json(text, name), name)


def main(argv: list[str] | None = None) -> int:
    """Run the core; return the exit code (the console script exits with it)."""
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # The handler is bound to this call's stderr; it is removed on return, so a caller running main()
    # in-process (tests) is not left with a handler on a stream it has since closed.
    loggers = [logging.getLogger(name) for name in ("runner", "infra_ext")]  # lightning logs on its own
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    # Lightning's adverts ("💡 Tip: … litlogger / litmodels") go; its other notices stay in the log.
    advert_filter = _NoAdverts()
    for name in LIGHTNING_NOTICE_LOGGERS:
        logging.getLogger(name).addFilter(advert_filter)
    from runner.core.training import EXIT_CANCELLED, Cancelled, GracefulStop

    stop = GracefulStop().install()
    try:
        from runner.core.experiment import run_experiment
        from runner.core.plugins import resolve_workdir
        from runner.core.sources import DataSource

        result = run_experiment(
            read_plan(args.plan),
            args.exp_dir,
            workdir=resolve_workdir(args.workdir),
            stop=stop,
            limit_batches=args.limit_batches,
            data=DataSource(db_path=args.db),
            # the host names the run (events carry it); this process runs one experiment
            experiment_id=os.environ.get("INFRA_EXPERIMENT_ID"),
        )
        test = ", ".join(f"{k}={v:.4f}" for k, v in result["test"].items() if isinstance(v, float))
        print(f"infra-train: done; test {test}", file=sys.stderr)
        return 0
    except Cancelled as exc:
        print(f"infra-train: cancelled: {exc}", file=sys.stderr)
        return EXIT_CANCELLED
    except InfraError as exc:
        print(f"infra-train: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_USAGE)
    except Exception:
        traceback.print_exc()
        return EXIT_EXPERIMENT_FAILED
    finally:
        stop.uninstall()
        for name in ("runner", "infra_ext"):  # a second main() in one process must not log twice
            logging.getLogger(name).removeHandler(handler)
        sys.stdout.flush()
        sys.stderr.flush()
        for name in LIGHTNING_NOTICE_LOGGERS:
            logging.getLogger(name).removeFilter(advert_filter)
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


def entry() -> None:
    """Console-script wrapper: `sys.exit(main())`."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
