"""`infra predict`: score mutants with a succeeded experiment's model, in the experiment's own image.

The host never loads the model: it checks the request, finds the experiment's checkpoint and
prediction state (untrusted files: no links followed), checks that the image its record names is an
infra plugin image the engine has, and runs `python -m runner.core.predict` in a container from it
(`runner.run.jobs.predict_job` on the run's backend: for docker the training's hardening, network
none, a read-only root, only the checkpoint, the prediction state and the input mounted read-only,
one fresh output folder), or as a host process with `--backend local` (trusted code, as
`infra run --backend local`). The core writes
into a private folder beside `--out`; the host moves the result into place with one rename, so
`--out` is either the complete new file or untouched.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from runner import safefs
from runner.errors import (
    EXIT_USAGE,
    DataError,
    ExperimentFailed,
    InfraError,
    Interrupted,
    UsageError,
)
from runner.run.jobs import core_error
from runner.run.records import Experiment, find

log = logging.getLogger(__name__)

FORMATS = ("csv", "parquet")
CHECKPOINTS = ("best.ckpt", "last.ckpt")  # the best epoch's weights, else the last epoch's
STATE_FILES = ("config/predict.json", "config/target_sorted.npy")  # the second only for data.transform rank
SUMMARY = "summary.json"
OUTPUT_TAIL_LINES = 40
UNFINISHED = ("created", "building", "starting", "running")


@dataclass(frozen=True)
class PredictRequest:
    """What `infra predict` was asked for (checked by `check_request`)."""

    experiment_id: str
    input: Path | None = None
    saturation: bool = False
    out: Path | None = None
    fmt: str | None = None
    top: int | None = None
    source: str | None = None


def output_format(out: Path | None, fmt: str | None) -> str:
    """--format, else the suffix of --out (.parquet/.pq is Parquet), else CSV."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise UsageError(f"--format {fmt!r}: use 'csv' or 'parquet'")
        return fmt
    return "parquet" if out is not None and out.suffix.lower() in (".parquet", ".pq") else "csv"


def default_out(experiment_id: str, fmt: str, saturation: bool) -> Path:
    """`./predictions-<id>[-saturation].<csv|parquet>` in the current directory."""
    return Path.cwd() / f"predictions-{experiment_id}{'-saturation' if saturation else ''}.{fmt}"


def check_request(req: PredictRequest) -> tuple[Path | None, Path, str]:
    """(input, out, format) once the flags, the input file and the output folder are usable; UsageError else."""
    if (req.input is None) == (not req.saturation):
        raise UsageError("give an INPUT file of mutants or --saturation (not both)")
    if req.top is not None and req.top < 1:
        raise UsageError(f"--top {req.top}: must be a positive number of rows")
    fmt = output_format(req.out, req.fmt)
    source = None
    if req.input is not None:
        source = Path(req.input).absolute()
        try:
            st = os.stat(source)
            with open(source, "rb"):
                pass
        except OSError as exc:
            raise UsageError(
                f"input {req.input}: cannot be read ({exc.strerror}); give a CSV/TSV with a 'mutant' column"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"input {req.input}: not a regular file; give a CSV/TSV with a 'mutant' column")
    out = Path(req.out).absolute() if req.out is not None else default_out(req.experiment_id, fmt, req.saturation)
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory; name the file to write")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist or is not writable")
    return source, out, fmt


def succeeded_experiment(workdir: Path, experiment_id: str) -> tuple[Experiment, dict]:
    """The experiment and its (reconciled) record; exit 4 when unknown, 2 while unfinished, 1 when it failed."""
    from runner.run.reconcile import reconcile

    exp = find(workdir, experiment_id)
    record = reconcile(exp)
    state = record["state"]
    if state in UNFINISHED:
        raise UsageError(
            f"experiment {experiment_id} is {state}, not succeeded; wait for it ('infra status {experiment_id}')"
        )
    if state != "succeeded":
        raise ExperimentFailed(
            f"experiment {experiment_id} is {state}, not succeeded: it has no trained model to predict with; "
            f"see 'infra logs {experiment_id}' and run it again"
        )
    return exp, record


def _regular(exp: Experiment, rel: str) -> bool:
    """Whether `rel` below the experiment is a regular file (False when missing); Tampered for a link etc."""
    folder, name = rel.rsplit("/", 1)
    with safefs.open_dir(exp.root, folder) as dfd:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
    if not stat.S_ISREG(st.st_mode):
        raise safefs.Tampered(exp.root / rel, f"is {safefs._kind(st.st_mode)}")
    return True


def model_files(exp: Experiment) -> tuple[str, list[str]]:
    """The checkpoint to load (relative path) and the prediction state files present."""
    try:
        ckpt = next((f"ckpts/{n}" for n in CHECKPOINTS if _regular(exp, f"ckpts/{n}")), None)
        if ckpt is None:
            raise ExperimentFailed(
                f"experiment {exp.id} has no checkpoint ({' or '.join('ckpts/' + n for n in CHECKPOINTS)}); "
                "run it again with 'infra run PLAN --rerun'"
            )
        if not _regular(exp, STATE_FILES[0]):
            raise UsageError(
                f"experiment {exp.id} lacks {STATE_FILES[0]}: it was trained before infra saved what prediction "
                "needs (template, vocab, target transform); run it again with 'infra run PLAN --rerun'"
            )
        state = [rel for rel in STATE_FILES if _regular(exp, rel)]
    except FileNotFoundError as exc:  # a folder of the layout is missing
        raise ExperimentFailed(f"experiment {exp.id}: {exc.filename or 'a folder'} is missing; run it again") from None
    return ckpt, state


def predict(workdir: Path, req: PredictRequest, backend=None) -> dict:
    """Run one prediction on `backend` (default: the one that trained the experiment); the summary
    document (rows, predicted, errors, out, format, seconds, …)."""
    from runner.run.backends import backend_of
    from runner.run.jobs import predict_job
    from runner.run.spec import LABEL_PURPOSE, workdir_identity

    started = time.perf_counter()
    source, out, fmt = check_request(req)
    exp, record = succeeded_experiment(workdir, req.experiment_id)
    ckpt, state = model_files(exp)
    backend = backend or backend_of(record)
    image, image_id = backend.experiment_image(record)
    scratch = Path(tempfile.mkdtemp(prefix=".infra-predict-", dir=out.parent))
    try:
        result_name = f"result.{fmt}"
        core_args = ["--format", fmt]
        core_args += ["--saturation"] if req.saturation else []
        core_args += ["--top", str(req.top)] if req.top else []
        core_args += ["--source", req.source] if req.source else []
        job = predict_job(
            experiment_id=exp.id,
            exp_root=exp.root,
            checkpoint=ckpt,
            state_files=tuple(state),
            source=source,
            out_dir=scratch,
            result_name=result_name,
            summary_name=SUMMARY,
            core_args=tuple(core_args),
            workdir=workdir,
            labels={LABEL_PURPOSE: "predict"},
            name=f"infra-predict-{exp.id}-{workdir_identity(workdir)[:8]}-{secrets.token_hex(3)}",
        ).with_image(image, image_id)
        try:
            output = backend.run_once(job)
        except KeyboardInterrupt:
            raise Interrupted(f"prediction with {exp.id} interrupted; nothing was written") from None
        summary = _collect(scratch, result_name, out, output.exit_code, output.stderr, exp.id)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary.update(
        experiment_id=exp.id,
        checkpoint=ckpt,
        backend=backend.name,
        out=str(out),
        seconds=round(time.perf_counter() - started, 3),
    )
    if summary["predicted"] == 0:
        error = UsageError(
            f"none of the {summary['rows']} rows could be predicted; each row's reason is in the error column of {out}"
        )
        error.document = summary
        raise error
    return summary


def _collect(scratch: Path, result_name: str, out: Path, code: int, output: str, eid: str) -> dict:
    """Check what the core left in `scratch` (untrusted), move the result to `out`; the core's summary."""
    from runner.lines import terminal_safe

    tail = terminal_safe("\n".join(output.splitlines()[-OUTPUT_TAIL_LINES:]))
    reason = core_error("predict", tail)
    if code not in (0, EXIT_USAGE):
        raise ExperimentFailed(
            f"prediction with {eid} failed (exit {code}){': ' + reason if reason else ''}", code, tail, reason
        )
    try:
        summary = json.loads(safefs.read_bytes(scratch, SUMMARY, limit=1 << 20))
        ok = isinstance(summary, dict) and all(
            isinstance(summary.get(k), int) and not isinstance(summary.get(k), bool)
            for k in ("rows", "predicted", "errors")
        )
    except FileNotFoundError:
        if code == EXIT_USAGE:
            raise DataError(reason or f"prediction with {eid} refused its input (exit 2)") from None
        summary, ok = None, False
    except (ValueError, InfraError):
        summary, ok = None, False
    if not ok:
        raise ExperimentFailed(f"prediction with {eid} left no usable summary", code, tail)
    try:
        # scratch is this process's own 0700 folder; only the core wrote inside it
        regular = stat.S_ISREG(os.lstat(scratch / result_name).st_mode)
    except FileNotFoundError:
        regular = False
    if not regular:
        raise ExperimentFailed(f"prediction with {eid} left no regular result file", code, tail)
    os.replace(scratch / result_name, out)
    errors = summary.get("errors_by_reason")
    return {
        "rows": summary["rows"],
        "predicted": summary["predicted"],
        "errors": summary["errors"],
        "errors_by_reason": {str(k)[:32]: v for k, v in errors.items() if isinstance(v, int)}
        if isinstance(errors, dict)
        else {},
        "written": summary.get("written") if isinstance(summary.get("written"), int) else None,
        "format": "parquet" if result_name.endswith("parquet") else "csv",
    }
