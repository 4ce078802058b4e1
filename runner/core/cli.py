"""`infra-train PLAN --exp-dir DIR [--workdir W] [--db PATH]`: the training core's entry point.

Exit codes: 0 success, 2 bad plan or data (one line on stderr), 1 any other failure (traceback on
stderr), 143 stopped by SIGTERM (last.ckpt saved; the host marks the run cancelled).
"""

from __future__ import annotations

import argparse
import contextlib
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
    from runner.core.training import GracefulStop

    args = _parser().parse_args(argv)
    stop = GracefulStop().install()
    try:
        return run_point(
            args.plan,
            args.exp_dir,
            workdir=args.workdir,
            db=args.db,
            # the host names the run (events carry it); this process runs one experiment
            experiment_id=os.environ.get("INFRA_EXPERIMENT_ID"),
            stop=stop,
            limit_batches=args.limit_batches,
        )
    finally:
        stop.uninstall()


def run_point(
    plan_path: str | Path,
    exp_dir: str | Path,
    *,
    workdir=None,
    db: str | None = None,
    experiment_id: str | None = None,
    stop=None,
    limit_batches: int | None = None,
    shared=None,
    on_stop=None,
) -> int:
    """One experiment from its plan file to its exit code, as `infra-train` runs it (and each point of a
    study slot): 0 done, 2 bad plan or data (the `infra-train: error:` line), 1 any other failure
    (a traceback), 143 stopped (last.ckpt saved).

    `shared` (a `runner.core.shared.SharedData`) lends what earlier points of the same process
    computed; `on_stop` receives the point's stop object (None when it ends), so a slot can stop it.
    """
    from runner.core.training import GracefulStop

    stop = stop or GracefulStop()
    if on_stop is not None:
        on_stop(stop)
    with _core_logging():
        return _run_point(plan_path, exp_dir, workdir, db, experiment_id, stop, limit_batches, shared, on_stop)


def _run_point(plan_path, exp_dir, workdir, db, experiment_id, stop, limit_batches, shared, on_stop) -> int:
    from runner.core.training import EXIT_CANCELLED, Cancelled

    try:
        _set_threads()
        from runner.core.experiment import run_experiment
        from runner.core.plugins import resolve_workdir

        plan = read_plan(str(plan_path))
        source = _source(db, shared)
        with source.point(plan) if shared is not None else contextlib.nullcontext():
            result = run_experiment(
                plan,
                exp_dir,
                workdir=resolve_workdir(workdir),
                stop=stop,
                limit_batches=limit_batches,
                data=source,
                experiment_id=experiment_id,
            )
        test = ", ".join(f"{k}={v:.4f}" for k, v in result["test"].items() if isinstance(v, float))
        # a null test metric is said with its reason, never left out silently
        undefined = [f"{k[5:]} ({why})" for k, why in result.get("undefined", {}).items() if k.startswith("test.")]
        gaps = f"; undefined: {', '.join(undefined)}" if undefined else ""
        print(f"infra-train: done; test {test}{gaps}", file=sys.stderr)
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
        if on_stop is not None:
            on_stop(None)
        sys.stdout.flush()
        sys.stderr.flush()


@contextlib.contextmanager
def _core_logging():
    """The core's log lines on stderr for one run. The handler is bound to this call's stderr and removed
    after it, so a caller running many experiments in one process (a slot, tests) never logs twice or
    to a stream it has since closed; Lightning's adverts are filtered, its other notices kept."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in ("runner", "infra_ext")]  # lightning logs on its own
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    advert_filter = _NoAdverts()
    for name in LIGHTNING_NOTICE_LOGGERS:
        logging.getLogger(name).addFilter(advert_filter)
    try:
        yield
    finally:
        for name in LIGHTNING_NOTICE_LOGGERS:
            logging.getLogger(name).removeFilter(advert_filter)
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


def _source(db: str | None, shared):
    """Where the point's variants and split come from: fresh, or a slot's shared data."""
    from runner.core.sources import DataSource

    if shared is None:
        return DataSource(db_path=db)
    from runner.core.shared import SlotData

    return SlotData(shared, db_path=db)


def _set_threads() -> None:
    """torch's intra-op threads from INFRA_THREADS (the host sets it from resources.cpus, or a study
    slot's share of the node): a slot must not take every core while others run beside it."""
    threads = os.environ.get("INFRA_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        import torch

        torch.set_num_threads(int(threads))


def entry() -> None:
    """Console-script wrapper: `sys.exit(main())`."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
