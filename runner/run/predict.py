"""`infra predict`: score mutants with a succeeded experiment's model, in the experiment's own image.

The host never loads the model: it checks the request, finds the experiment's checkpoint and
prediction state (untrusted files: no links followed), checks that the image its record names is an
infra plugin image the engine has, and runs `python -m runner.core.predict` in a container from it
(`runner.run.jobs.predict_job` on the run's backend: for docker the training's hardening, network
none, a read-only root, only the checkpoint, the prediction state and the input mounted read-only,
one fresh output folder), or as a host process with `--backend local` (trusted code, as
`infra run --backend local`). The container runs with the training's memory and CPU limits (the
plan's `resources`, from the plan the record vouches for) and an overall time limit (`--timeout`).
The core writes a CSV into a private folder beside `--out`; that file is the container's (any mode,
any content), so the host never hands it over: it reads it row by row as untrusted input (a regular
file no larger than the input can give, infra's header for this input, every cell checked, every
row INPUT's own row or the template's next substitution: `runner.run.predict_io`), counts the rows
itself (the core's summary is only checked against them), ranks `--top` itself, and writes a NEW
file of its own beside `--out` (the invoker's, mode 0644 & ~umask; CSV cells that a spreadsheet
would run as a formula prefixed with a quote, or Parquet of infra's schema), then renames that into
place once every check passed: `--out` is either the complete new file or untouched. `--out -` writes that file to stdout once it is complete. Several experiments (ids, or a
study's points) are an ensemble: each member runs as above, one after the other, and their rows
are merged as they stream (`runner.run.ensemble`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
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
from runner.run.ensemble import check_same_templates, merge, parse_rank, top_rows
from runner.run.jobs import PREDICT_MAX_TEMPLATE, Limits, core_error
from runner.run.predict_io import (
    Layout,
    Row,
    field_chars,
    field_limit,
    input_checked,
    input_columns,
    longest_input_cell,
    open_result,
    read_result,
    saturation_checked,
    writer_for,
)
from runner.run.records import Experiment, find, plan_sha256

log = logging.getLogger(__name__)

FORMATS = ("csv", "parquet")
CHECKPOINTS = ("best.ckpt", "last.ckpt")  # the best epoch's weights, else the last epoch's
STATE_FILES = ("config/predict.json", "config/target_sorted.npy")  # the second only for data.transform rank
# what the core tells `measured` and `in_train` from, mounted when the experiment has them
DATA_FILES = ("data/selected.parquet", "splits/train.npy")
SUMMARY = "summary.json"
OUTPUT_TAIL_LINES = 40
UNFINISHED = ("created", "building", "starting", "running")
DEFAULT_TIMEOUT_S = 3600.0  # `--timeout`: the whole prediction, container start to exit
# The most bytes a result may have: OUTPUT_SLACK + rows × (template length + OUTPUT_ROW_BYTES) + three
# times the (uncompressed) input, where rows is at most the input's line count (+1), --top N, or for
# --saturation template length × 255. Three times the input: every input cell is copied, quoted
# (an empty cell `,` becomes `"",`: 3 bytes for 1), its quotes doubled.
OUTPUT_ROW_BYTES = 256  # sequence separators, the prediction, the longest error text, flags, quoting
OUTPUT_SLACK = 1 << 20  # the header
COPY_CHUNK = 1 << 20
RESULT = "result.csv"  # the core always writes CSV for the host: the Parquet a user gets is the host's
STDOUT = "-"


@dataclass(frozen=True)
class PredictRequest:
    """What `infra predict` was asked for (checked by `check_request`): one experiment, or several (an
    ensemble; `study` names the study they came from). `out` Path("-") is stdout."""

    experiment_ids: tuple[str, ...]
    input: Path | None = None
    saturation: bool = False
    out: Path | None = None
    fmt: str | None = None
    top: int | None = None
    source: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    rank: str = "mean"
    study: str | None = None
    where: tuple[str, ...] = ()  # the --where that chose the study's points (for messages)

    @property
    def to_stdout(self) -> bool:
        return self.out is not None and str(self.out) == STDOUT


def output_format(out: Path | None, fmt: str | None) -> str:
    """--format, else the suffix of --out (.parquet/.pq is Parquet), else CSV."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise UsageError(f"--format {fmt!r}: use 'csv' or 'parquet'")
        return fmt
    return "parquet" if out is not None and out.suffix.lower() in (".parquet", ".pq") else "csv"


def default_out(name: str, fmt: str, saturation: bool) -> Path:
    """`./predictions-<name>[-saturation].<csv|parquet>` in the current directory (`name`: the
    experiment id, a study id, or the first member's id and `-ensemble<N>`)."""
    return Path.cwd() / f"predictions-{name}{'-saturation' if saturation else ''}.{fmt}"


def request_name(req: PredictRequest) -> str:
    if req.study:
        return req.study
    ids = req.experiment_ids
    return ids[0] if len(ids) == 1 else f"{ids[0]}-ensemble{len(ids)}"


def check_request(req: PredictRequest, workdir: Path | None = None) -> tuple[Path | None, Path | None, str]:
    """(input, out, format) once the flags, the input file and the output folder are usable; UsageError else.

    `out` is None for stdout (`--out -`). The input must be a regular file (opened without blocking:
    a FIFO or a device is refused, never waited on); `--out` must not be inside `workdir`'s
    experiments folder (the host's records live there).
    """
    if not req.experiment_ids:
        raise UsageError("give an experiment id (several for an ensemble) or --study STUDY")
    if (req.input is None) == (not req.saturation):
        raise UsageError("give an INPUT file of mutants or --saturation (not both)")
    if req.top is not None and req.top < 1:
        raise UsageError(f"--top {req.top}: must be a positive number of rows")
    if not req.timeout_s > 0:
        raise UsageError(f"--timeout {req.timeout_s:g}: must be a positive number of seconds")
    rank = parse_rank(req.rank)
    if rank.ucb and len(req.experiment_ids) < 2:
        if req.study:
            raise UsageError(
                f"--rank {req.rank}: study {req.study} has one succeeded point{' matching --where' if req.where else ''}"
                ", and one model has no spread; run more seeds of it, or rank by mean"
            )
        raise UsageError(f"--rank {req.rank}: one model has no spread; give several experiments or --study")
    fmt = output_format(None if req.to_stdout else req.out, req.fmt)
    source = None
    if req.input is not None:
        source = Path(req.input).absolute()
        _check_input(source, req.input)
    if req.to_stdout:
        return source, None, fmt
    out = Path(req.out).absolute() if req.out is not None else default_out(request_name(req), fmt, req.saturation)
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


def _folder_has(exp: Experiment, rel: str) -> bool:
    """`_regular`, False when the folder itself is missing too (an experiment from before it was kept)."""
    try:
        return _regular(exp, rel)
    except FileNotFoundError:
        return False


def model_files(exp: Experiment) -> tuple[str, list[str]]:
    """The checkpoint to load (relative path) and the files the core reads besides it: the prediction
    state, and the experiment's selected data and training split when it has them (`measured`, `in_train`)."""
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
        state += [rel for rel in DATA_FILES if _folder_has(exp, rel)]
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
    # every source an object with a text name and template, as the training writes it (and as
    # `runner.run.ensemble.templates_of` and the core read it)
    fine = isinstance(sources, list) and bool(sources) and type(seq_len) is int
    fine = fine and all(
        isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("template"), str) for s in sources
    )
    if not fine:
        raise ExperimentFailed(
            f"{where} is not what the training writes (sources: objects with a name and a template; seq_len: a "
            "number); the file was altered or is damaged: run the plan again with --rerun"
        )
    templates = [s["template"] for s in sources]
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
    return OUTPUT_SLACK + rows * (template_len + OUTPUT_ROW_BYTES) + 3 * text


@dataclass
class Predicted:
    """What `predict` did: the summary document, the output's columns, and the first rows written
    (at most `preview` of them) for the caller to show."""

    summary: dict
    layout: Layout
    shown: list[Row] = field(default_factory=list)


def predict(workdir: Path, req: PredictRequest, backend=None, stream=None, preview: int = 0) -> Predicted:
    """Run the prediction of one experiment, or of each member of an ensemble, on `backend` (default:
    the one that trained each experiment) and write the output; the summary document (rows,
    predicted, errors, written, out, format, seconds, …).

    With `--out -` the complete output is written to the binary `stream` (nothing when it is None: the
    caller shows the `preview` rows instead). SIGTERM and SIGHUP act as Ctrl-C while it runs: the
    backend stops and removes the container (or kills the core's process group), the scratch folder
    is removed, and the command exits 130.
    """
    with _signals_interrupt():
        return _predict(workdir, req, backend, stream, preview)


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


@dataclass
class Member:
    """One experiment of the prediction, checked and ready to run."""

    exp: Experiment
    checkpoint: str
    files: list[str]
    limits: Limits
    models: object
    backend: object
    image: tuple[str | None, str | None]
    together: bool  # its image's core predicts several experiments in one run (an older one may not)
    bound: int
    template_len: int  # the longest template or seq_len: no sequence of its result is longer
    template: str | None  # the request's source's template (None: the core must refuse the request)

    def tells(self, flag: str) -> bool:
        """Whether the core was given the files to tell `measured` (data/selected.parquet) or `in_train`
        (that and splits/train.npy): without them every row's flag must be empty."""
        need = DATA_FILES[:1] if flag == "measured" else DATA_FILES
        return all(rel in self.files for rel in need)


def source_template(exp: Experiment, source: str | None) -> str | None:
    """The template the core predicts against: `--source`'s, or the only one (None when the request
    does not pick one: the core refuses it)."""
    from runner.run.ensemble import templates_of

    sources = templates_of(exp)
    if source is None:
        return sources[0][1] if len(sources) == 1 else None
    return next((t for n, t in sources if n == source), None)


def prepare_member(workdir: Path, eid: str, source: Path | None, req: PredictRequest, backend=None) -> Member:
    """An experiment's checks before anything runs (a bad member stops the ensemble before its first
    container): succeeded, its model files, template length, vouched plan, limits, image."""
    from runner.run.backends import backend_of

    exp, record = succeeded_experiment(workdir, eid)
    ckpt, files = model_files(exp)
    template_len = state_template_length(exp)
    plan = vouched_plan(exp, record)
    models = plan_models(plan, record, workdir)
    chosen = backend or backend_of(record)
    image = chosen.experiment_image(record)
    return Member(
        exp=exp,
        checkpoint=ckpt,
        files=files,
        limits=Limits.from_resources(plan.resources),
        models=models,
        backend=chosen,
        image=image,
        together=chosen.predicts_members_together(image),
        bound=output_bound(source, req.saturation, None, template_len),  # every row: --top is the host's
        template_len=template_len,
        template=source_template(exp, req.source),
    )


def _predict(workdir: Path, req: PredictRequest, backend, stream, preview: int) -> Predicted:
    started = time.perf_counter()
    source, out, fmt = check_request(req, workdir)
    rank = parse_rank(req.rank)
    ensemble = len(req.experiment_ids) > 1
    layout = Layout(input_columns(source), ensemble, rank.ucb)
    members = [prepare_member(workdir, eid, source, req, backend) for eid in req.experiment_ids]
    if ensemble:
        check_same_templates([m.exp for m in members])
    ids = [m.exp.id for m in members]
    where = str(out) if out is not None else "stdout"
    scratch = Path(tempfile.mkdtemp(prefix=".infra-predict-", dir=out.parent if out else None))
    try:
        folders = [scratch / f"m{i}" for i in range(len(members))]
        for folder in folders:
            folder.mkdir(mode=0o700)
        cores: list[dict | None] = [None] * len(members)
        for run, group in enumerate(share_a_start(members)):  # one core start-up per image, not per member
            summaries = run_members(
                workdir, [members[i] for i in group], [folders[i] for i in group], source, req, where
            )
            for i, summary in zip(group, summaries, strict=True):
                cores[i] = {**summary, "run": run}
        chars = field_chars(max(m.template_len for m in members), longest_input_cell(source))
        with field_limit(chars):
            counted = [Counts() for _ in members]
            results = [
                c.through(member_rows(scratch / f"m{i}", m, layout, source, refusal(m.exp.id, where)))
                for i, (m, c) in enumerate(zip(members, counted, strict=True))
            ]
            merged = Counts()
            rows = merged.through(merge(results, ids, rank) if ensemble else results[0])
            if req.top:  # the host ranks, for one model as for an ensemble: the core gave every row
                rows = iter(top_rows(rows, req.top, rank)[0])
            summary: dict = {}

            def check() -> None:  # every row read: before anything is put in place or on stdout
                for m, core, c in zip(members, cores, counted, strict=True):
                    cross_check(m, core, c, refusal(m.exp.id, where))
                summary.update(summarise(cores, counted, merged))

            written, shown = write_output(rows, layout, fmt, out, scratch, stream, preview, check)
    finally:
        safefs.remove_tree(scratch, ignore_errors=True)  # iterative: the container may leave any depth
    summary.update(written=written, format=fmt, columns=layout.header(), out=str(out) if out else STDOUT)
    if ensemble:
        summary.update(
            experiment_ids=ids,
            study=req.study,
            rank=str(rank),
            members=[{"experiment_id": m.exp.id, "backend": m.backend.name, "checkpoint": m.checkpoint,
                      "rows": c.rows, "predicted": c.predicted, "errors": c.rows - c.predicted,
                      "seconds": core["seconds"], "run": core["run"]}
                     for m, core, c in zip(members, cores, counted, strict=True)],
        )  # fmt: skip
    else:
        summary.update(experiment_id=ids[0], checkpoint=members[0].checkpoint, backend=members[0].backend.name)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    if summary["predicted"] == 0:
        error = UsageError(
            f"none of the {summary['rows']} rows could be predicted; each row's reason is in the error column of {where}"
        )
        error.document = summary
        raise error
    return Predicted(summary, layout, shown)


def member_rows(folder: Path, m: Member, layout: Layout, source: Path | None, refuse) -> Iterator[Row]:
    """One member's result rows as they stream, each checked: infra's table (`read_result`), and the
    request's rows: INPUT's mutant and cells row by row, or the template's single substitutions."""
    rows = read_result(open_result(folder, RESULT, m.bound, refuse), layout.inputs, refuse, m.template_len)
    if source is not None:
        return input_checked(rows, source, refuse)
    return saturation_checked(rows, m.template, refuse)


def refusal(eid: str, where: str):
    def refuse(why: str) -> ExperimentFailed:
        return ExperimentFailed(f"prediction with {eid} left a result that {why}; nothing was written to {where}")

    return refuse


def share_a_start(members: list[Member]) -> list[list[int]]:
    """The members' indices grouped by what their core run needs to be one (backend, image, limits,
    model store), in the members' order: an ensemble of one study's seeds is one group, so it pays one
    core start-up (about 6 s of importing torch and Lightning) instead of one per member. A member whose
    image's core predates shared runs (`Member.together` false) runs alone."""
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(members):
        key = (m.backend.name, m.image, m.limits, m.models) if m.together else ("alone", i)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def run_members(
    workdir: Path, group: list[Member], folders: list[Path], source, req: PredictRequest, where: str
) -> list[dict]:
    """Run one core for `group` (members sharing a backend and image), each member's result into its
    folder (`folder/RESULT`, unread); each member's checked summary, in order.

    The core predicts the members one after another and stops at the first failure, so the member that
    failed is the first without a summary: the error names it, as a member's own core run would."""
    from runner.run.backends import CoreTimeout
    from runner.run.jobs import PredictMember, predict_job
    from runner.run.spec import LABEL_PURPOSE, workdir_identity

    started = time.perf_counter()
    core_args = ["--format", "csv"]
    core_args += ["--saturation"] if req.saturation else []
    core_args += ["--source", req.source] if req.source else []
    first = group[0]
    job = predict_job(
        members=tuple(
            PredictMember(m.exp.id, m.exp.root, m.checkpoint, tuple(m.files), folder)
            for m, folder in zip(group, folders, strict=True)
        ),
        source=source,
        result_name=RESULT,
        summary_name=SUMMARY,
        core_args=tuple(core_args),
        workdir=workdir,
        labels={LABEL_PURPOSE: "predict"},
        name=f"infra-predict-{first.exp.id}-{workdir_identity(workdir)[:8]}-{secrets.token_hex(3)}",
        limits=first.limits,
        timeout_s=req.timeout_s * len(group),  # --timeout is each member's: they share the run
        models=first.models,
    ).with_image(*first.image)
    ids = ", ".join(m.exp.id for m in group)
    try:
        output = first.backend.run_once(job)
    except KeyboardInterrupt:
        raise Interrupted(f"prediction with {ids} interrupted; nothing was written") from None
    except CoreTimeout:
        limit = f"{req.timeout_s:g} s (--timeout)"
        if len(group) > 1:
            limit = f"{req.timeout_s * len(group):g} s (--timeout {req.timeout_s:g} s for each of {len(group)})"
        raise ExperimentFailed(
            f"prediction with {ids} did not finish within {limit}; it was stopped and nothing was written to {where}"
        ) from None
    if output.exit_code != 0 and len(group) > 1:  # the first member without a summary failed
        failed = next((k for k, f in enumerate(folders) if not _regular_file(f / SUMMARY)), len(group) - 1)
        eid = group[failed].exp.id
        try:
            core_summary(folders[failed], output.exit_code, output.stderr, eid)
        except DataError as exc:  # a refusal says what, not always whose: name the member
            named = (
                exc.message
                if exc.message.startswith(f"prediction with {eid} ")
                else f"prediction with {eid}: {exc.message}"
            )
            raise DataError(named) from None
    seconds = round(time.perf_counter() - started, 3)
    summaries = []
    for m, folder in zip(group, folders, strict=True):
        summary = core_summary(folder, output.exit_code, output.stderr, m.exp.id)
        summary["seconds"] = seconds  # the members' shared run
        summaries.append(summary)
    return summaries


def _regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def core_summary(folder: Path, code: int, output: str, eid: str) -> dict:
    """The core's exit and summary (untrusted: shapes checked) as {rows, predicted, errors,
    errors_by_reason, measured, in_train}; ExperimentFailed when it failed, DataError when it refused its input."""
    from runner.lines import terminal_safe

    tail = terminal_safe("\n".join(output.splitlines()[-OUTPUT_TAIL_LINES:]))
    reason = core_error("predict", tail)
    if code not in (0, EXIT_USAGE):
        raise ExperimentFailed(
            f"prediction with {eid} failed (exit {code}){': ' + reason if reason else ''}", code, tail, reason
        )
    try:
        summary = json.loads(safefs.read_bytes(folder, SUMMARY, limit=1 << 20))
        ok = isinstance(summary, dict) and all(_count(summary.get(k)) for k in ("rows", "predicted", "errors"))
    except FileNotFoundError:
        if code == EXIT_USAGE:
            raise DataError(reason or f"prediction with {eid} refused its input (exit 2)") from None
        summary, ok = None, False
    except (ValueError, InfraError):
        summary, ok = None, False
    if not ok:
        raise ExperimentFailed(f"prediction with {eid} left no usable summary", code, tail)
    errors = summary.get("errors_by_reason")
    return {
        "rows": summary["rows"],
        "predicted": summary["predicted"],
        "errors": summary["errors"],
        # the core's reason names (printed by the CLI): plain words only
        "errors_by_reason": {k: v for k, v in errors.items() if _REASON.fullmatch(str(k)) and _count(v)}
        if isinstance(errors, dict)
        else {},
        "measured": summary.get("measured") if _count(summary.get("measured")) else None,
        "in_train": summary.get("in_train") if _count(summary.get("in_train")) else None,
    }


def _count(value) -> bool:
    return type(value) is int and value >= 0


class Counts:
    """Rows, predicted rows and flags counted by the host as the rows stream past (before --top keeps
    some): the summary's counts, never the core's."""

    def __init__(self):
        self.rows = self.predicted = self.measured = self.in_train = 0
        self.told = {"measured": False, "in_train": False}  # whether any row had the flag

    def through(self, rows: Iterator[Row]) -> Iterator[Row]:
        for row in rows:
            self.rows += 1
            self.predicted += row.prediction is not None
            if row.measured is not None:
                self.told["measured"] = True
                self.measured += row.measured
            if row.in_train is not None:
                self.told["in_train"] = True
                self.in_train += bool(row.in_train)
            yield row


def cross_check(m: Member, core: dict, counts: Counts, refuse) -> None:
    """The core's summary against the rows the host read from its result: the same rows, predicted
    rows and errors (its errors_by_reason adding up to them), the same flag counts; no flag where
    the experiment lacks the files to tell it. A disagreement `refuse`s the result."""
    got = (counts.rows, counts.predicted, counts.rows - counts.predicted)
    said = (core["rows"], core["predicted"], core["errors"])
    if got != said:
        raise refuse(
            f"has {got[0]:,} rows ({got[1]:,} predicted) where its summary says {said[0]:,} ({said[1]:,} predicted)"
        )
    if sum(core["errors_by_reason"].values()) != got[2]:
        raise refuse(f"has {got[2]:,} rows with errors where its summary's errors_by_reason add up to otherwise")
    for flag in ("measured", "in_train"):
        value = getattr(counts, flag)
        if counts.told[flag] and not m.tells(flag):
            raise refuse(f"says {flag} on rows though the experiment lacks the files to tell it")
        if core[flag] is not None and core[flag] != value:
            raise refuse(f"has {value:,} rows {flag} where its summary says {core[flag]:,}")


def summarise(cores: list[dict], counted: list[Counts], merged: Counts) -> dict:
    """The summary's counts: the host's own over the rows it read (every row: --top is applied after
    counting); `measured`/`in_train` null when no member told them (no row has the flag and no core
    said it could tell: the experiment lacks the files; for an ensemble `in_train` counts rows at
    least one member trained on); errors_by_reason the first member's, checked to add up (`cross_check`)."""

    def told(flag: str) -> bool:
        return any(c.told[flag] or core[flag] is not None for core, c in zip(cores, counted, strict=True))

    return {
        "rows": merged.rows,
        "predicted": merged.predicted,
        "errors": merged.rows - merged.predicted,
        "errors_by_reason": cores[0]["errors_by_reason"],
        "measured": merged.measured if told("measured") else None,
        "in_train": merged.in_train if told("in_train") else None,
    }


def write_output(
    rows, layout: Layout, fmt: str, out: Path | None, scratch: Path, stream, preview: int, before_commit=None
):
    """Write `rows` as a new file of this process's (mode 0644 & ~umask) beside `out`, renamed into
    place once complete; for stdout (`out` None) into `scratch`, then copied to `stream` (only once
    every row passed its checks: nothing half-written). `before_commit()`, called once every row is
    read and before the rename or the copy, may still refuse (its exception leaves nothing written).
    (rows written, the first `preview` rows)."""
    target = out if out is not None else scratch / f"output.{fmt}"
    shown: list[Row] = []
    written = 0
    if out is None and stream is None:  # a terminal's table only: no file to make
        for row in rows:
            written += 1
            if len(shown) < preview:
                shown.append(row)
        if before_commit is not None:
            before_commit()
        return written, shown
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            writer = writer_for(fmt, fh, layout)
            for row in rows:
                writer.write(row)
                written += 1
                if len(shown) < preview:
                    shown.append(row)
            writer.close()
            fh.flush()
            if out is not None:
                os.fsync(fh.fileno())
        if before_commit is not None:
            before_commit()
        if out is not None:
            os.replace(tmp, out)
        else:
            with open(tmp, "rb") as src:
                shutil.copyfileobj(src, stream, COPY_CHUNK)
            stream.flush()
    finally:
        tmp.unlink(missing_ok=True)
    return written, shown


def deliver(scratch: Path, result_name: str, out: Path, fmt: str, bound: int, eid: str, inputs=()) -> int:
    """Write `out` as a new file of this process's from one core's CSV result (never that file itself):
    every row checked (`read_result`), formula cells neutralised, renamed into place or nothing
    written. The number of data rows."""
    refuse = refusal(eid, str(out))
    with field_limit(field_chars(PREDICT_MAX_TEMPLATE, 0)):
        rows = read_result(open_result(scratch, result_name, bound, refuse), tuple(inputs), refuse)
        written, _ = write_output(rows, Layout(tuple(inputs)), fmt, out, scratch, None, 0)
    return written


_REASON = re.compile(r"[a-z_]{1,32}")
