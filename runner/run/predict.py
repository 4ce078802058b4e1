"""`infra predict`: score mutants with a succeeded experiment's model, in the experiment's own image.

The host never loads the model: it checks the request, finds the experiment's checkpoint and
prediction state (untrusted files: no links followed), checks that the image its record names is an
infra plugin image the engine has, and runs `python -m runner.core.predict` in a container from it
(`runner.run.jobs.predict_job` on the run's backend: for docker the training's hardening, network
none, a read-only root, only the checkpoint, the prediction state and the input mounted read-only,
one fresh output folder), or as a host process with `--backend local` (trusted code, as
`infra run --backend local`). The container runs with the training's memory and CPU limits (the
plan's `resources`, from the plan the record vouches for) and an overall time limit (`--timeout`).
The core writes into a private folder beside `--out`; that file is the container's (any mode, any
content), so the host never hands it over: it checks it (a regular file no larger than the input
can give, infra's CSV header or Parquet's magic) and writes a NEW file of its own beside `--out`
(the invoker's, mode 0644 & ~umask), CSV cells that a spreadsheet would run as a formula prefixed
with a quote, then renames that into place: `--out` is either the complete new file or untouched.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import secrets
import signal
import stat
import sys
import tempfile
import threading
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
from runner.run.jobs import PREDICT_MAX_TEMPLATE, Limits, core_error
from runner.run.records import Experiment, find, plan_sha256

log = logging.getLogger(__name__)

FORMATS = ("csv", "parquet")
CHECKPOINTS = ("best.ckpt", "last.ckpt")  # the best epoch's weights, else the last epoch's
STATE_FILES = ("config/predict.json", "config/target_sorted.npy")  # the second only for data.transform rank
SUMMARY = "summary.json"
OUTPUT_TAIL_LINES = 40
UNFINISHED = ("created", "building", "starting", "running")
DEFAULT_TIMEOUT_S = 3600.0  # `--timeout`: the whole prediction, container start to exit
# The most bytes a result may have: OUTPUT_SLACK + rows × (template length + OUTPUT_ROW_BYTES) + twice
# the (uncompressed) input, where rows is at most the input's line count (+1), --top N, or for
# --saturation template length × 255. Twice the input: a mutant's text is copied, quotes doubled.
OUTPUT_ROW_BYTES = 256  # sequence separators, the prediction, the longest error text, quoting
OUTPUT_SLACK = 1 << 20  # the header, and Parquet's own metadata
CSV_HEADER = ["mutant", "sequence", "prediction", "error"]
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # OWASP: what makes a spreadsheet cell a formula
COPY_CHUNK = 1 << 20


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
    timeout_s: float = DEFAULT_TIMEOUT_S


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


def check_request(req: PredictRequest, workdir: Path | None = None) -> tuple[Path | None, Path, str]:
    """(input, out, format) once the flags, the input file and the output folder are usable; UsageError else.

    The input must be a regular file (opened without blocking: a FIFO or a device is refused, never
    waited on); `--out` must not be inside `workdir`'s experiments folder (the host's records live there).
    """
    if (req.input is None) == (not req.saturation):
        raise UsageError("give an INPUT file of mutants or --saturation (not both)")
    if req.top is not None and req.top < 1:
        raise UsageError(f"--top {req.top}: must be a positive number of rows")
    if not req.timeout_s > 0:
        raise UsageError(f"--timeout {req.timeout_s:g}: must be a positive number of seconds")
    fmt = output_format(req.out, req.fmt)
    source = None
    if req.input is not None:
        source = Path(req.input).absolute()
        _check_input(source, req.input)
    out = Path(req.out).absolute() if req.out is not None else default_out(req.experiment_id, fmt, req.saturation)
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory; name the file to write")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist or is not writable")
    if workdir is not None:
        records = (Path(workdir) / "experiments").resolve()
        folder = out.parent.resolve()
        if folder == records or records in folder.parents:
            raise UsageError(
                f"--out {out}: inside the experiments folder {records}, where infra keeps its records; "
                "write predictions elsewhere"
            )
    return source, out, fmt


def _check_input(source: Path, given) -> None:
    """A regular file this process can read; opened non-blocking, so a FIFO never hangs the command."""
    what = "give a CSV/TSV with a 'mutant' column"
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"input {given}: cannot be read ({exc.strerror}); {what}") from None
    try:
        mode = os.fstat(fd).st_mode
    finally:
        os.close(fd)
    if not stat.S_ISREG(mode):
        raise UsageError(f"input {given}: {safefs._kind(mode)}, not a regular file; {what}")
    if source.suffix.lower() in (".zst", ".lz4"):
        raise UsageError(f"input {given}: {source.suffix} compression is not supported; give it plain, .gz or .bz2")


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


def state_template_length(exp: Experiment) -> int:
    """The longest template (or `seq_len`) in `config/predict.json`, checked to be at most
    `PREDICT_MAX_TEMPLATE`: the training wrote that file (plugin code can rewrite it), and the length
    multiplies every output row and a saturation's row count."""
    where = f"experiment {exp.id}: {STATE_FILES[0]}"
    try:
        state = json.loads(safefs.read_bytes(exp.root, STATE_FILES[0]))
    except (ValueError, UnicodeDecodeError, safefs.TooLarge):
        raise ExperimentFailed(f"{where} is not a readable prediction state; run the plan again with --rerun") from None
    sources = state.get("sources") if isinstance(state, dict) else None
    seq_len = state.get("seq_len") if isinstance(state, dict) else None
    templates = [s.get("template") for s in sources if isinstance(s, dict)] if isinstance(sources, list) else []
    if not templates or not all(isinstance(t, str) for t in templates) or type(seq_len) is not int:
        raise ExperimentFailed(f"{where} names no templates or seq_len; run the plan again with --rerun")
    longest = max(seq_len, *(len(t) for t in templates))
    if longest > PREDICT_MAX_TEMPLATE or seq_len < 1:
        raise ExperimentFailed(
            f"{where} has a template or seq_len of {longest:,} residues, outside 1..{PREDICT_MAX_TEMPLATE:,}: "
            "the file was altered or is damaged; run the plan again with --rerun"
        )
    return longest


def plan_limits(exp: Experiment, record: dict) -> Limits:
    """The training's memory and CPU limits, from `config/plan.json` only when it hashes to the record's
    `plan_sha256` (the training can rewrite config/, not the record): a prediction gets no more of the
    node than its training had, and a tampered plan cannot lift the limits."""
    return Limits.from_resources(vouched_plan(exp, record).resources)


def plan_models(plan, record: dict, workdir: Path):
    """The model store and embedding cache of a plm experiment's prediction (None for another
    embedding), after checking that the store still holds the weights the training used (the record's
    `model_sha256`): other weights under the same name would feed the trained head other features."""
    from runner import modelstore
    from runner.run.jobs import plm_places

    name = modelstore.plan_model(plan.embeddings)
    if name is None:
        return None
    model = modelstore.find(name)
    if model.sha256 != record.get("model_sha256"):
        raise UsageError(
            f"experiment {record.get('experiment_id')} was trained with other weights of model {name!r} "
            f"(sha256 {str(record.get('model_sha256'))[:12]}) than the store holds now ({model.sha256[:12]}): "
            f"add those weights back with 'infra models add {name} DIR --replace', or run the plan again"
        )
    return plm_places([plan], workdir)


def vouched_plan(exp: Experiment, record: dict):
    """The experiment's typed plan from `config/plan.json`, only when it hashes to the record's
    `plan_sha256` (the training can rewrite config/, not the record)."""
    from pydantic import ValidationError

    from runner.plan.models import Plan

    where = f"experiment {exp.id}: config/plan.json"
    try:
        doc = json.loads(safefs.read_bytes(exp.root, "config/plan.json"))
    except FileNotFoundError:
        raise ExperimentFailed(f"{where} is missing (its resources limit the prediction); run it again") from None
    except (ValueError, UnicodeDecodeError, safefs.TooLarge):
        doc = None
    fine = isinstance(doc, dict) and isinstance(doc.get("data"), dict)
    # the host's copy differs from the training's at most in data.db (the record's `db`)
    if not fine or record.get("plan_sha256") not in (
        plan_sha256(doc),
        plan_sha256({**doc, "data": {**doc["data"], "db": record.get("db")}}),
    ):
        raise safefs.Tampered(exp.root / "config/plan.json", "differs from the plan infra wrote (plan_sha256)")
    try:
        return Plan.model_validate(doc)
    except ValidationError:
        raise ExperimentFailed(f"{where} is not a valid plan for this infra; run it again") from None


def _input_extent(source: Path) -> tuple[int, int]:
    """(lines, bytes) of the input once decompressed (.gz, .bz2 as the core reads them)."""
    import bz2
    import gzip

    suffix = source.suffix.lower()
    opener = gzip.open if suffix == ".gz" else bz2.open if suffix == ".bz2" else open
    lines = size = 0
    try:
        with opener(source, "rb") as fh:
            while chunk := fh.read(COPY_CHUNK):
                lines += chunk.count(b"\n")
                size += len(chunk)
    except (OSError, EOFError) as exc:
        raise UsageError(f"input {source}: cannot be read ({exc}); give a CSV/TSV with a 'mutant' column") from None
    return lines, size


def output_bound(source: Path | None, saturation: bool, top: int | None, template_len: int) -> int:
    """The most bytes a result of this request can have (docs/cli.md, 'Predicting'): anything larger is
    not infra's output, whatever the core's summary says."""
    if saturation:
        rows, text = template_len * 255, 0  # each position to each other letter a vocabulary can have
    else:
        lines, text = _input_extent(source)
        rows = lines + 1
    if top is not None:
        rows = min(rows, top)
    return OUTPUT_SLACK + rows * (template_len + OUTPUT_ROW_BYTES) + 2 * text


def predict(workdir: Path, req: PredictRequest, backend=None) -> dict:
    """Run one prediction on `backend` (default: the one that trained the experiment); the summary
    document (rows, predicted, errors, out, format, seconds, …).

    SIGTERM and SIGHUP act as Ctrl-C while it runs: the backend stops and removes the container (or
    kills the core's process group), the scratch folder is removed, and the command exits 130.
    """
    with _signals_interrupt():
        return _predict(workdir, req, backend)


@contextlib.contextmanager
def _signals_interrupt():
    """SIGTERM and SIGHUP raise KeyboardInterrupt for the duration, so the cleanup that Ctrl-C gets
    (the backend's and the scratch folder's) also runs when a session or a supervisor ends the command.
    Only the main thread can install handlers; elsewhere the caller's signal handling stands."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    saved = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _predict(workdir: Path, req: PredictRequest, backend=None) -> dict:
    from runner.run.backends import CoreTimeout, backend_of
    from runner.run.jobs import predict_job
    from runner.run.spec import LABEL_PURPOSE, workdir_identity

    started = time.perf_counter()
    source, out, fmt = check_request(req, workdir)
    exp, record = succeeded_experiment(workdir, req.experiment_id)
    ckpt, state = model_files(exp)
    template_len = state_template_length(exp)
    plan = vouched_plan(exp, record)
    limits = Limits.from_resources(plan.resources)
    models = plan_models(plan, record, workdir)
    bound = output_bound(source, req.saturation, req.top, template_len)
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
            limits=limits,
            timeout_s=req.timeout_s,
            models=models,
        ).with_image(image, image_id)
        try:
            output = backend.run_once(job)
        except KeyboardInterrupt:
            raise Interrupted(f"prediction with {exp.id} interrupted; nothing was written") from None
        except CoreTimeout:
            raise ExperimentFailed(
                f"prediction with {exp.id} did not finish within {req.timeout_s:g} s (--timeout); "
                "it was stopped and nothing was written"
            ) from None
        summary = _collect(scratch, result_name, out, output.exit_code, output.stderr, exp.id, bound)
    finally:
        safefs.remove_tree(scratch, ignore_errors=True)  # iterative: the container may leave any depth
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


def _collect(scratch: Path, result_name: str, out: Path, code: int, output: str, eid: str, bound: int) -> dict:
    """Check what the core left in `scratch` (untrusted) and write `out` from it (`deliver`); the summary."""
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
    fmt = "parquet" if result_name.endswith("parquet") else "csv"
    written = deliver(scratch, result_name, out, fmt, bound, eid)
    if written is None:  # Parquet: the host checks its frame, not its rows
        written = summary.get("written") if type(summary.get("written")) is int else None
    errors = summary.get("errors_by_reason")
    return {
        "rows": summary["rows"],
        "predicted": summary["predicted"],
        "errors": summary["errors"],
        # the core's reason names (printed by the CLI): plain words only
        "errors_by_reason": {k: v for k, v in errors.items() if _REASON.fullmatch(str(k)) and type(v) is int}
        if isinstance(errors, dict)
        else {},
        "written": written,
        "format": fmt,
    }


def deliver(scratch: Path, result_name: str, out: Path, fmt: str, bound: int, eid: str) -> int | None:
    """Write `out` as a new file of this process's from the core's result (never that file itself).

    The result is opened without following links or blocking and must be a regular file of at most
    `bound` bytes; a CSV must have infra's header and four cells a row, with a number or nothing as
    the prediction, and cells that start a spreadsheet formula get a leading `'`; a Parquet file must
    begin and end with its magic. The new file (mode 0644 & ~umask) is written beside `out` and
    renamed into place, or removed on any failure. Returns the CSV's data rows (None for Parquet).
    """

    def refuse(why: str) -> ExperimentFailed:
        return ExperimentFailed(f"prediction with {eid} left a result that {why}; nothing was written to {out}")

    try:
        # scratch is this process's own 0700 folder (the mount point: the core cannot replace it)
        fd = os.open(scratch / result_name, safefs.READ_FLAGS)
    except FileNotFoundError:
        raise refuse("is missing") from None
    except OSError as exc:  # ELOOP: a symbolic link
        raise refuse(f"cannot be opened as a file ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as src:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise refuse(f"is {safefs._kind(st.st_mode)}")
        if st.st_size > bound:
            raise refuse(f"has {st.st_size:,} bytes, more than the {bound:,} its input can give")
        bounded = io.BufferedReader(_Capped(src, bound), COPY_CHUNK)
        tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp")
        dst_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            with os.fdopen(dst_fd, "wb") as dst:
                rows = _copy_csv(bounded, dst, refuse) if fmt == "csv" else _copy_parquet(bounded, dst, refuse)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return rows


class _Capped(io.RawIOBase):
    """A raw reader over `src` that fails once more than `limit` bytes came through (the file could
    still grow after it was measured, e.g. by a process the core left behind)."""

    def __init__(self, src, limit: int):
        self.src, self.left = src, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.src.read(min(len(buffer), self.left + 1))
        if len(data) > self.left:
            raise ExperimentFailed("the prediction's result grew past its size limit while it was read")
        self.left -= len(data)
        buffer[: len(data)] = data
        return len(data)


_REASON = re.compile(r"[a-z_]{1,32}")


def _neutral(cell: str) -> str:
    """A text cell a spreadsheet would run as a formula, prefixed with a quote (OWASP's advice)."""
    return "'" + cell if cell.startswith(FORMULA_STARTS) else cell


def _quoted(cell: str) -> str:
    return '"' + _neutral(cell).replace('"', '""') + '"'


def _copy_csv(src, dst, refuse) -> int:
    """infra's four-column CSV from `src` to `dst`, re-written cell by cell; the number of data rows.

    As the core writes it: text cells always quoted (so a line break or a comma inside one stays
    inside it), the prediction a bare number (Python's shortest repr of the parsed float) or nothing.
    """
    text = io.TextIOWrapper(src, encoding="utf-8", errors="strict", newline="")
    sink = io.TextIOWrapper(dst, encoding="utf-8", newline="", write_through=False)
    saved = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)  # the whole file is bounded already; a mutant's text may be long
    rows = 0
    try:
        reader = csv.reader(text, strict=True)
        if next(reader, None) != CSV_HEADER:
            raise refuse(f"is not infra's prediction table (its header is not {','.join(CSV_HEADER)})")
        sink.write(",".join(_quoted(c) for c in CSV_HEADER) + "\n")
        for row in reader:
            rows += 1
            if len(row) != 4:
                raise refuse(f"is not infra's prediction table (data row {rows} has {len(row)} cells, not 4)")
            mutant, sequence, prediction, error = row
            try:
                prediction = repr(float(prediction)) if prediction else ""
            except ValueError:
                raise refuse(
                    f"is not infra's prediction table (data row {rows}: the prediction is not a number)"
                ) from None
            sink.write(f"{_quoted(mutant)},{_quoted(sequence)},{prediction},{_quoted(error)}\n")
    except (csv.Error, UnicodeDecodeError) as exc:
        raise refuse(f"is not a UTF-8 CSV ({type(exc).__name__} near data row {rows})") from None
    finally:
        csv.field_size_limit(saved)
    sink.flush()
    sink.detach()
    return rows


PARQUET_MAGIC = b"PAR1"


def _copy_parquet(src, dst, refuse) -> None:
    """The Parquet file's bytes from `src` to `dst`, checked to begin and end with Parquet's magic."""
    head = src.read(len(PARQUET_MAGIC))
    if head != PARQUET_MAGIC:
        raise refuse("is not a Parquet file (no PAR1 magic at its start)")
    dst.write(head)
    tail = head
    while chunk := src.read(COPY_CHUNK):
        dst.write(chunk)
        tail = (tail + chunk)[-len(PARQUET_MAGIC) :]
    if dst.tell() < 3 * len(PARQUET_MAGIC) or tail != PARQUET_MAGIC:
        raise refuse("is not a complete Parquet file (no PAR1 magic at its end)")
    return None
