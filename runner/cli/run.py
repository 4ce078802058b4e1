"""`infra run` and `infra build`."""

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from runner.cli.output import emit_event, emit_json, say
from runner.cli.progress import RunView, view_mode
from runner.run.records import metrics_summary

JSON_OPT = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout when done.")]
WORKDIR_OPT = Annotated[
    Path | None, typer.Option("--workdir", help="Workdir to use (default: INFRA_WORKDIR, then 'infra workdir set').")
]


def _workdir(flag: Path | None) -> Path:
    from runner.errors import WorkdirError
    from runner.workdir.store import get_workdir

    if flag is not None:
        if not flag.is_dir():
            raise WorkdirError(f"--workdir {flag} is not a directory; create it or use 'infra init {flag}'")
        return flag.resolve()
    return get_workdir(required=True)


def run(
    plan: Annotated[str, typer.Argument(help="Plan JSON file, or '-' to read it from stdin.")],
    gpus: Annotated[
        str | None,
        typer.Option("--gpus", help='GPUs: "all", a count, a device list "0,2", or "none" (overrides resources.gpus).'),
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a plan key: KEY=VALUE. Repeatable.")
    ] = None,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Return once the training runs; poll with 'infra status ID'.")
    ] = False,
    backend: Annotated[
        str, typer.Option("--backend", help="docker (a container) or local (a host process; needs '.[core]').")
    ] = "docker",
    rerun: Annotated[
        bool, typer.Option("--rerun", help="Run again even if this experiment already succeeded.")
    ] = False,
    stop_timeout: Annotated[
        int, typer.Option("--stop-timeout", help="Seconds Ctrl-C gives the training to checkpoint.")
    ] = 60,
    events: Annotated[
        bool, typer.Option("--events", help="Stream JSON lines (state changes, log lines, result) on stdout.")
    ] = False,
    json_out: JSON_OPT = False,
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
    from runner.errors import ExperimentFailed, Interrupted, UsageError
    from runner.plan.load import load_plan
    from runner.run.launch import RunOptions
    from runner.run.launch import run as run_experiment

    if sweeps and dry_run:
        raise UsageError("--dry-run does not go with --sweep; dry-run one point with --set")
    if sweeps:
        from runner.cli.sweep import run_sweep_command

        run_sweep_command(
            plan,
            sweeps,
            overrides or [],
            gpus=gpus,
            detach=detach,
            backend=backend,
            rerun=rerun,
            stop_timeout=stop_timeout,
            events=events,
            json_out=json_out,
            view=view_mode(quiet=quiet, verbose=_verbose(verbose), machine=json_out),
            workdir=_workdir(workdir),
            submit=submit,
            redis_url=redis_url,
            queue=queue,
        )
        return
    if submit:
        raise UsageError("--submit goes with --sweep; to queue one plan use 'infra submit PLAN --redis URL'")
    wd = _workdir(workdir)
    loaded = load_plan(plan, overrides or [], workdir=wd)
    if dry_run:
        from runner.run.launch import dry_run as describe_run

        doc = describe_run(loaded, wd, RunOptions(backend=backend, gpus=gpus))
        emit_json(doc) if json_out else typer.echo(json.dumps(doc, indent=2))
        return
    view = RunView(view_mode(quiet=quiet, verbose=_verbose(verbose), machine=json_out or events), wd)
    if events:
        callbacks = {"on_log": lambda line: emit_event({"event": "log", "line": line}), "on_event": emit_event}
    else:
        callbacks = {} if json_out else view.options()
    opts = RunOptions(backend=backend, gpus=gpus, detach=detach, rerun=rerun, stop_timeout=stop_timeout, **callbacks)
    view.validated(loaded.plan.name, plan)
    try:
        outcome = run_experiment(loaded, wd, opts)
    except (ExperimentFailed, Interrupted) as exc:
        record = getattr(exc, "record", None)
        if record is not None:
            exc.document = _summary(record, Path(record["exp_dir"]))
        raise
    finally:
        view.stop()
    doc = {**outcome.to_dict(), **metrics_summary(outcome.exp_dir)}
    if events:
        emit_event({"event": "result", **doc})
    elif json_out:
        emit_json(doc)
    elif not detach:
        view.finish(doc)
    if outcome.reused:
        say(f"experiment {outcome.experiment_id} already succeeded; reported, not rerun (use --rerun to force)")
    elif detach:
        say(
            f"experiment {outcome.experiment_id} {outcome.record['state']}; follow with 'infra logs {outcome.experiment_id} --follow'"
        )
    else:
        test = doc.get("test") or {}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float))
        say(f"experiment {outcome.experiment_id} succeeded{': test ' + shown if shown else ''} ({outcome.exp_dir})")
    if not (json_out or events) and detach:
        typer.echo(outcome.experiment_id)


def _verbose(flag: bool) -> bool:
    """`infra run -v`, or the global `infra -v run` (which sets the log level before the command runs)."""
    return flag or logging.getLogger().getEffectiveLevel() <= logging.INFO


def _summary(record: dict, exp_dir: Path) -> dict:
    keys = ("experiment_id", "state", "attempt", "backend", "container_id", "image", "image_id", "exit_code", "message")
    return {**{k: record.get(k) for k in keys}, "exp_dir": str(exp_dir), **metrics_summary(exp_dir)}


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

    Tags are content hashes: an unchanged workdir is never rebuilt. The base image uses
    INFRA_BASE_OS / INFRA_TORCH_SPEC build args when set, or INFRA_BASE_IMAGE as a ready base.

    Example: infra build --dry-run --json
    """
    import os

    from runner import engine
    from runner.images import builds
    from runner.images.decide import decide_image

    if dry_run:
        doc = _dry_run(None if base else _workdir(workdir))
        (emit_json(doc) if json_out else typer.echo(_describe(doc)))
        return
    client = engine.get_client()
    if base:
        ref = builds.ensure_base_image(
            client,
            base_image=os.environ.get("INFRA_BASE_OS") or None,
            torch_spec=os.environ.get("INFRA_TORCH_SPEC") or None,
            on_log=say,
            force=force,
        )
    else:
        wd = _workdir(workdir)
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
