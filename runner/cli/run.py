"""`infra run` and `infra build`."""

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from runner.cli import options
from runner.cli.options import BACKEND_OPT, GPUS_OPT, JSON_OPT, WORKDIR_OPT
from runner.cli.output import echo, emit_event, emit_json, say
from runner.cli.progress import RunView, view_mode
from runner.run.backends import BackendName
from runner.run.records import metrics_summary, outcome_summary


def run(
    plan: Annotated[str, typer.Argument(help="Plan JSON file, or '-' to read it from stdin.")],
    gpus: GPUS_OPT = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a plan key: KEY=VALUE. Repeatable.")
    ] = None,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Return once the training runs; poll with 'infra status ID'.")
    ] = False,
    backend: BACKEND_OPT = BackendName.docker,
    rerun: Annotated[
        bool, typer.Option("--rerun", help="Run again even if this experiment already succeeded.")
    ] = False,
    stop_timeout: Annotated[
        int, typer.Option("--stop-timeout", help="Seconds Ctrl-C gives the training to checkpoint.")
    ] = 60,
    events: Annotated[
        bool, typer.Option("--events", help="Stream JSON lines (state changes, log lines, result) on stdout.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout when done.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only the result line (and errors); no progress.")
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Print the raw image build and training output lines as they come."),
    ] = False,
    workdir: WORKDIR_OPT = None,
    sweeps: Annotated[
        list[str] | None,
        typer.Option(
            "--sweep",
            help="Run a grid: KEY=V1,V2,... (values JSON, else strings; a value with a comma needs the JSON "
            'list form KEY=\'["a,b","c"]\'). Repeatable: the cartesian product, one experiment each.',
        ),
    ] = None,
    submit: Annotated[
        bool, typer.Option("--submit", help="With --sweep: put the grid on the queue (--redis) instead of running it.")
    ] = False,
    redis_url: Annotated[
        str | None, typer.Option("--redis", envvar="INFRA_REDIS_URL", help="Redis URL for --submit.")
    ] = None,
    queue: Annotated[str, typer.Option("--queue", help="Queue for --submit.")] = "infra",
    parallel: Annotated[
        int | None,
        typer.Option(
            "--parallel",
            help="With --sweep: run up to N points at once, each in its own long-lived slot with 1/N of the "
            "CPUs (default: one slot per GPU given by --gpus, else 1).",
        ),
    ] = None,
    cv: Annotated[
        bool,
        typer.Option(
            "--cv",
            help='Run every fold of the plan\'s split (as split.fold "all"): a study of one experiment per fold.',
        ),
    ] = False,
    isolated: Annotated[
        bool,
        typer.Option(
            "--isolated",
            help="With --sweep: a fresh training process per point (as single runs), not long-lived slots; "
            "for plugins that keep global state between experiments.",
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print what would run (experiment id, image, the container's user, mounts, capabilities, "
            "limits, labels, command) and stop: nothing is built, written or started.",
        ),
    ] = False,
) -> None:
    """Validate the plan, build or reuse the plugin image, and run the experiment.

    Idempotent: the experiment id derives from the plan and the plugin image, so a plan that already
    succeeded is reported (exit 0) rather than rerun, a running one is attached to, and a failed or
    cancelled one resumes from its last checkpoint. Exit codes: 0 ok, 1 training failed, 2 bad plan,
    3 environment, 130 interrupted.

    With --sweep the grid's experiments run one after another and a summary table follows (with
    --json one document {"experiments": [...]}); the exit code is the worst of the runs.

    Example: infra run plan.json --gpus all --set train.lr=0.0005
    Example: infra run plan.json --sweep train.lr=1e-3,1e-4 --sweep model.params.hidden=64,128
    Example: infra run plan.json --dry-run --json

    On a terminal the progress is a live view (phases, a spinner with the build step or the epoch,
    one line per epoch, a summary table); otherwise one line per phase and per epoch. The full build
    log is the experiment's build.log, the training's output its container.log.
    """
    from runner.errors import UsageError

    wd = options.resolve_workdir(workdir)
    view = view_mode(quiet=quiet, verbose=_verbose(verbose), machine=json_out or events)
    if cv or _folds_all(plan, overrides):
        if plan == "-":
            raise UsageError(
                "--cv reads the plan's folds from a plan file: give a file, or --sweep split.fold=0,1,2,3,4"
            )
        if any(item.partition("=")[0].strip() == "split.fold" for item in sweeps or []):
            raise UsageError("--cv and --sweep split.fold=… say the same thing twice; keep one")
        sweeps = [*(sweeps or []), _fold_items(plan, overrides, wd)]
    if sweeps:
        from runner.cli.sweep import run_sweep_command

        run_sweep_command(
            plan, sweeps, overrides or [], gpus=options.gpus(gpus), detach=detach, backend=options.backend(backend),
            rerun=rerun, stop_timeout=stop_timeout, events=events, json_out=json_out, view=view, workdir=wd,
            submit=submit, redis_url=redis_url, queue=queue, parallel=parallel, isolated=isolated, dry_run=dry_run,
        )  # fmt: skip
        return
    if submit:
        raise UsageError("--submit goes with --sweep; to queue one plan use 'infra submit PLAN --redis URL'")
    if parallel is not None or isolated:
        raise UsageError("--parallel and --isolated go with --sweep (a study of several points)")
    from runner.plan.load import load_plan
    from runner.run.launch import RunOptions

    loaded = load_plan(plan, overrides or [], workdir=wd)
    opts = RunOptions(
        backend=options.backend(backend), gpus=options.gpus(gpus), detach=detach, rerun=rerun, stop_timeout=stop_timeout
    )
    if dry_run:
        from runner.run.launch import dry_run as describe_run

        doc = describe_run(loaded, wd, opts)
        emit_json(doc) if json_out else echo(json.dumps(doc, indent=2))
        return
    _run_one(loaded, wd, opts, plan, RunView(view, wd), events=events, json_out=json_out)


def _run_one(loaded, wd: Path, opts, source: str, view: RunView, *, events: bool, json_out: bool) -> None:
    """Run one experiment with its progress shown (or its events streamed); the result line or document."""
    from runner.errors import ExperimentFailed, Interrupted
    from runner.run.launch import run as run_experiment

    if events:
        opts.on_log = lambda line: emit_event({"event": "log", "line": line})
        opts.on_event = emit_event
    elif not json_out:
        for key, callback in view.options().items():
            setattr(opts, key, callback)
    view.validated(loaded.plan.name, source)
    try:
        outcome = run_experiment(loaded, wd, opts)
    except (ExperimentFailed, Interrupted) as exc:
        record = getattr(exc, "record", None)
        if record is not None:
            exc.document = _summary(record, Path(record["exp_dir"]))
        raise
    finally:
        view.stop()
    doc = {**outcome.to_dict(), **metrics_summary(outcome.exp_dir), **outcome_summary(outcome.exp_dir)}
    if loaded.plan.tracking is not None:
        from runner.run.records import Experiment
        from runner.run.tracking import tracked_url

        doc["mlflow_run_url"] = tracked_url(Experiment(outcome.exp_dir), outcome.record)
    if events:
        emit_event({"event": "result", **doc})
    elif json_out:
        emit_json(doc)
    elif not opts.detach:
        view.finish(doc)
    eid = outcome.experiment_id
    if outcome.reused:
        say(f"experiment {eid} already succeeded; reported, not rerun (use --rerun to force)")
    elif opts.detach:
        say(f"experiment {eid} {outcome.record['state']}; follow with 'infra logs {eid} --follow'")
    else:
        test = doc.get("test") or {}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float))
        say(f"experiment {eid} succeeded{': test ' + shown if shown else ''} ({outcome.exp_dir})")
    if doc.get("mlflow_run_url") and not opts.detach:
        say(f"MLflow run: {doc['mlflow_run_url']}")
    if not (json_out or events) and opts.detach:
        echo(eid)


def _folds_all(plan: str, overrides: list[str] | None) -> bool:
    """Whether the plan asks for every fold (`split.fold: "all"`): then the run is a study."""
    if plan == "-":
        return False  # stdin can be read once: `split.fold: "all"` from stdin needs --cv
    from runner.plan.document import apply_overrides, expand_dotted, parse_json, read_plan_text

    # The document only: the whole plan is validated later, per point for a sweep (whose values may
    # be what completes it, e.g. a `{model.params.hidden}` placeholder the sweep fills).
    text, name, _ = read_plan_text(plan)
    doc, issues = expand_dotted(parse_json(text, name))
    if issues:
        return False  # the run reports them
    split = apply_overrides(doc, overrides or []).get("split")
    return isinstance(split, dict) and split.get("fold") == "all"


def _fold_items(plan: str, overrides: list[str] | None, wd: Path) -> str:
    """The `--sweep split.fold=[0,…]` item of the plan's folds."""
    from runner.plan.load import load_plan
    from runner.run.sweep import fold_sweep

    return fold_sweep(load_plan(plan, [*(overrides or []), "split.fold=0"], workdir=wd, check_db=False))


def _verbose(flag: bool) -> bool:
    """`infra run -v`, or the global `infra -v run` (which sets the log level before the command runs)."""
    return flag or logging.getLogger().getEffectiveLevel() <= logging.INFO


def _summary(record: dict, exp_dir: Path) -> dict:
    keys = ("experiment_id", "state", "attempt", "backend", "container_id", "image", "image_id", "exit_code", "message")
    return {
        **{k: record.get(k) for k in keys},
        "exp_dir": str(exp_dir),
        **metrics_summary(exp_dir),
        **outcome_summary(exp_dir),
    }


def build(
    base: Annotated[
        bool, typer.Option("--base", help="Build (or reuse) the base image instead of the plugin image.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Build even when an image with the same content hash exists.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would be built (tag, args, context) and stop.")
    ] = False,
    json_out: JSON_OPT = False,
    workdir: WORKDIR_OPT = None,
) -> None:
    """Build (or reuse) the plugin image for the workdir; `--base` for the base image.

    Tags are content hashes: an unchanged workdir is never rebuilt. The base image follows the node
    settings ('infra config', INFRA_* variables): base_os / torch_spec as its build args, or
    base_image (INFRA_BASE_IMAGE) as a ready base that is never built.

    Example: infra build --dry-run --json
    """
    from runner import engine
    from runner.images import builds
    from runner.images.decide import decide_image, ensure_base

    if dry_run:
        doc = _dry_run(None if base else options.resolve_workdir(workdir))
        (emit_json(doc) if json_out else echo(_describe(doc)))
        return
    client = engine.get_client()
    if base:
        ref = ensure_base(client, say, force=force)
    else:
        wd = options.resolve_workdir(workdir)
        decision = decide_image(client, wd, say)
        if decision.image_id and not force:
            ref = builds.ImageRef(decision.spec.tag, decision.image_id, decision.spec.content_hash, built=False)
        else:
            ref = builds.build(client, decision.spec, say)
    doc = {
        "tag": ref.tag,
        "id": ref.id,
        "content_hash": ref.content_hash,
        "built": ref.built,
        "seconds": round(ref.seconds, 2),
    }
    if json_out:
        emit_json(doc)
    say(f"{'built' if ref.built else 'reused'} {ref.tag} ({ref.id[:19]})")


def _dry_run(workdir: Path | None) -> dict:
    """`infra build --dry-run`: what would be built, the base step included; inspects, never builds.

    Without a reachable engine the plan is still printed, with `exists` null."""
    from runner import engine
    from runner.errors import EnvironmentProblem
    from runner.images.decide import plan_images

    try:
        client = engine.get_client(timeout=10)
    except EnvironmentProblem as exc:
        say(f"infra: warning: {exc}; whether images exist is unknown")
        client = None
    return plan_images(client, workdir)


def _describe(doc: dict) -> str:
    """The dry run as lines: one per image step, then its details."""
    lines = []
    for step in ("base", "plugins"):
        image = doc.get(step)
        if image is None:
            continue
        state = {True: "exists", False: "missing", None: "unknown (no engine)"}[image.get("exists")]
        action = "would build" if image.get("would_build") else "would reuse"
        if image.get("source") == "INFRA_BASE_IMAGE":
            action = "a ready image (INFRA_BASE_IMAGE), never built"
        lines.append(f"{step}: {image.get('tag') or '(tag known once the base exists)'}: {state}; {action}")
        for key in ("dockerfile", "buildargs", "labels", "problem", "note"):
            if image.get(key):
                lines.append(f"  {key}: {image[key]}")
        context = image.get("context") or []
        if context:
            more = " ..." if len(context) > 12 else ""
            lines.append(f"  context: {len(context)} entries: {' '.join(context[:12])}{more}")
    return "\n".join(lines)
