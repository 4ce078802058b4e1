"""`infra predict`: score mutants with a succeeded experiment's model, in the experiment's own image.

The host never loads the model: it checks the request, finds the experiment's checkpoint and
prediction state (untrusted files: no links followed), checks that the image its record names is an
infra plugin image the engine has, and runs `python -m runner.core.predict` in a container from it
(`runner.run.spec.predict_spec`: the training's hardening, network none, a read-only root, only the
checkpoint, the prediction state and the input mounted read-only, one fresh output folder), or as a
host process with `--backend local` (trusted code, as `infra run --backend local`). The core writes
into a private folder beside `--out`; the host moves the result into place with one rename, so
`--out` is either the complete new file or untouched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from runner import safefs
from runner.errors import (
    EXIT_USAGE,
    DataError,
    EnvironmentProblem,
    ExperimentFailed,
    InfraError,
    Interrupted,
    UsageError,
)
from runner.run.records import Experiment, find

log = logging.getLogger(__name__)

FORMATS = ("csv", "parquet")
CHECKPOINTS = ("best.ckpt", "last.ckpt")  # the best epoch's weights, else the last epoch's
STATE_FILES = ("config/predict.json", "config/target_sorted.npy")  # the second only for data.transform rank
SUMMARY = "summary.json"
OUTPUT_TAIL_LINES = 40
IMAGE_TAG = re.compile(r"infra-plugins:([0-9a-f]{12})")
IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")
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
    backend: str = "docker"


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
    if req.backend not in ("docker", "local"):
        raise UsageError(f"--backend {req.backend!r}: use 'docker' or 'local'")
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


def checked_image(client, record: dict) -> tuple[str, str]:
    """(tag, image id) of the experiment's plugin image, after checking the untrusted record against the
    engine: a well-formed tag and id, the id present, labelled an infra plugin image of that content hash."""
    from runner import engine

    tag, image_id, eid = record.get("image"), record.get("image_id"), record.get("experiment_id")
    if record.get("backend") == "local" and not image_id:
        raise UsageError(f"experiment {eid} was trained with --backend local (no image); predict with --backend local")
    tag_match = IMAGE_TAG.fullmatch(tag) if isinstance(tag, str) else None
    if tag_match is None or not isinstance(image_id, str) or not IMAGE_ID.fullmatch(image_id):
        raise ExperimentFailed(
            f"experiment {eid}: its record names no valid infra image ({str(tag)[:80]!r}, {str(image_id)[:80]!r}); "
            "the record was altered or is damaged: run the plan again"
        )
    if not engine.image_exists(client, image_id):
        raise EnvironmentProblem(
            f"image {tag} ({image_id[:19]}) of experiment {eid} is no longer in the Docker engine: "
            "rebuild it with 'infra build' (same plugins) or run the plan again with --rerun"
        )
    labels = engine.image_labels(client, image_id)
    if labels.get("infra.kind") != "plugins" or not str(labels.get("infra.content_hash", "")).startswith(tag_match[1]):
        raise ExperimentFailed(
            f"image {image_id[:19]} named by experiment {eid}'s record is not infra's plugin image {tag} "
            "(its infra.* labels do not match); refusing to run it"
        )
    return tag, image_id


def predict(workdir: Path, req: PredictRequest, settings=None, client=None) -> dict:
    """Run one prediction; the summary document (rows, predicted, errors, out, format, seconds, …)."""
    from runner.settings import node_settings

    started = time.perf_counter()
    source, out, fmt = check_request(req)
    exp, record = succeeded_experiment(workdir, req.experiment_id)
    ckpt, state = model_files(exp)
    settings = settings or node_settings()
    scratch = Path(tempfile.mkdtemp(prefix=".infra-predict-", dir=out.parent))
    try:
        result_name = f"result.{fmt}"
        core_args = ["--format", fmt]
        core_args += ["--saturation"] if req.saturation else []
        core_args += ["--top", str(req.top)] if req.top else []
        core_args += ["--source", req.source] if req.source else []
        if req.backend == "local":
            core_args += ["--input", str(source)] if source else []
            code, output = _run_local(exp, workdir, ckpt, scratch, result_name, core_args)
        else:
            code, output = _run_docker(
                exp, record, workdir, ckpt, state, source, scratch, result_name, core_args, settings, client
            )
        summary = _collect(scratch, result_name, out, code, output, exp.id)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary.update(
        experiment_id=exp.id,
        checkpoint=ckpt,
        backend=req.backend,
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


def _core_command(exp_dir: str, ckpt: str, out_dir: str, result_name: str, core_args: list[str]) -> list[str]:
    return ["python", "-m", "runner.core.predict", "--exp-dir", exp_dir, "--checkpoint", ckpt,
            "--out", f"{out_dir}/{result_name}", "--summary", f"{out_dir}/{SUMMARY}", *core_args]  # fmt: skip


def _run_docker(exp, record, workdir, ckpt, state, source, scratch, result_name, core_args, settings, client):
    from runner import engine
    from runner.run.hardening import unprivileged_user
    from runner.run.spec import (
        CONTAINER_EXP,
        CONTAINER_WORKDIR,
        PREDICT_IN,
        PREDICT_OUT,
        predict_spec,
        workdir_identity,
    )

    client = client or engine.get_client()
    _, image_id = checked_image(client, record)
    user = unprivileged_user(settings=settings)
    if os.geteuid() == 0:  # the container's user writes the output folder
        os.chown(scratch, *user)
    os.chmod(scratch, 0o700)
    files = [(exp.root / rel, f"{CONTAINER_EXP}/{rel}") for rel in (ckpt, *state)]
    args = list(core_args)
    if source is not None:
        in_name = "input" + "".join(source.suffixes[-2:])  # keeps .tsv / .csv.gz for the reader
        files.append((source, f"{PREDICT_IN}/{in_name}"))
        args += ["--input", f"{PREDICT_IN}/{in_name}"]
    command = _core_command(CONTAINER_EXP, f"{CONTAINER_EXP}/{ckpt}", PREDICT_OUT, result_name, args)
    spec = predict_spec(
        experiment_id=exp.id,
        name=f"infra-predict-{exp.id}-{workdir_identity(workdir)[:8]}-{secrets.token_hex(3)}",
        image=image_id,
        image_id=image_id,
        workdir=workdir,
        settings=settings,
        user=user,
        read_only_files=tuple(files),
        out_dir=scratch,
        command=(*command, "--workdir", CONTAINER_WORKDIR),
    )
    container = engine.run_container(client, spec.image, **spec.engine_kwargs())
    try:
        try:
            code = engine.wait(container)
        except KeyboardInterrupt:
            engine.stop(container, timeout=5)
            raise Interrupted(f"prediction with {exp.id} interrupted; nothing was written") from None
        output = engine.container_output(container, stdout=False, tail=OUTPUT_TAIL_LINES)
    finally:
        engine.remove_container(container)
    return code, output


def _run_local(exp, workdir, ckpt, scratch, result_name, core_args):
    import importlib.util

    missing = [m for m in ("torch", "lightning", "pyarrow") if importlib.util.find_spec(m) is None]
    if missing:
        raise EnvironmentProblem(
            f"--backend local runs the training core in this Python, which lacks {', '.join(missing)}: "
            "install it with \"pip install 'infra[core]'\" (or use the docker backend)"
        )
    command = _core_command(str(exp.root), str(exp.root / ckpt), str(scratch), result_name, core_args)
    command = [sys.executable, *command[1:], "--workdir", str(workdir)]
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: bounded however much the core prints
        try:
            proc = subprocess.run(
                command, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, cwd=str(scratch)
            )
        except KeyboardInterrupt:
            raise Interrupted(f"prediction with {exp.id} interrupted; nothing was written") from None
        err.seek(max(0, os.fstat(err.fileno()).st_size - 16384))
        output = err.read().decode("utf-8", "replace")
    return proc.returncode, output


def _collect(scratch: Path, result_name: str, out: Path, code: int, output: str, eid: str) -> dict:
    """Check what the core left in `scratch` (untrusted), move the result to `out`; the core's summary."""
    from runner.lines import terminal_safe

    tail = terminal_safe("\n".join(output.splitlines()[-OUTPUT_TAIL_LINES:]))
    reason = next(
        (line.split("error:", 1)[1].strip() for line in reversed(tail.splitlines()) if "infra-predict: error:" in line),
        None,
    )
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
