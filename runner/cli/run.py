"""`infra run` and `infra build`."""

from pathlib import Path
from typing import Annotated

import typer

from runner.cli.output import emit_event, emit_json, say

JSON_OPT = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout when done.")]
WORKDIR_OPT = Annotated[
    Path | None, typer.Option("--workdir", help="Workdir to use (default: INFRA_WORKDIR, then 'infra workdir set').")
]


def _workdir(flag: Path | None) -> Path:
    from runner.errors import WorkdirError
    from runner.workdir import get_workdir

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
    workdir: WORKDIR_OPT = None,
    sweeps: Annotated[
        list[str] | None,
        typer.Option(
            "--sweep",
            help="Run a grid: KEY=V1,V2,... (values JSON, else strings; a value with a comma needs the JSON "
            "list form KEY='[\"a,b\",\"c\"]'). Repeatable: the cartesian product, one experiment each.",
        ),
    ] = None,
    submit: Annotated[
        bool, typer.Option("--submit", help="With --sweep: put the grid on the queue (--redis) instead of running it.")
    ] = False,
    redis_url: Annotated[
        str | None, typer.Option("--redis", envvar="INFRA_REDIS_URL", help="Redis URL for --submit.")
    ] = None,
    queue: Annotated[str, typer.Option("--queue", help="Queue for --submit.")] = "infra",
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
    """
    from runner.errors import ExperimentFailed, Interrupted, UsageError
    from runner.launch import RunOptions
    from runner.launch import run as run_experiment
    from runner.plan import load_plan

    if sweeps:
        from runner.cli.sweep import run_sweep_command

        run_sweep_command(
            plan, sweeps, overrides or [], gpus=gpus, detach=detach, backend=backend, rerun=rerun,
            stop_timeout=stop_timeout, events=events, json_out=json_out, workdir=_workdir(workdir),
            submit=submit, redis_url=redis_url, queue=queue,
        )
        return
    if submit:
        raise UsageError("--submit goes with --sweep; to queue one plan use 'infra submit PLAN --redis URL'")
    wd = _workdir(workdir)
    loaded = load_plan(plan, overrides or [], workdir=wd)
    quiet = json_out or events
    opts = RunOptions(
        backend=backend,
        gpus=gpus,
        detach=detach,
        rerun=rerun,
        stop_timeout=stop_timeout,
        on_log=(lambda line: emit_event({"event": "log", "line": line}))
        if events
        else (lambda line: None)
        if json_out
        else say,
        on_event=emit_event if events else (lambda e: None) if quiet else _say_event,
    )
    try:
        outcome = run_experiment(loaded, wd, opts)
    except (ExperimentFailed, Interrupted) as exc:
        record = getattr(exc, "record", None)
        if record is not None and quiet:
            doc = _summary(record, Path(record["exp_dir"]))
            doc["error"] = _error_object(exc)
            (emit_event({"event": "result", **doc}) if events else emit_json(doc))
            raise typer.Exit(exc.exit_code) from None
        raise
    doc = {**outcome.to_dict(), **_metrics(outcome.exp_dir)}
    if events:
        emit_event({"event": "result", **doc})
    elif json_out:
        emit_json(doc)
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
    if not quiet and detach:
        typer.echo(outcome.experiment_id)


CORE_ERROR = "infra-train: error: "


def _error_object(exc) -> dict:
    """The `error` of a failed run's JSON document, shaped like the CLI's error documents, plus
    `reason`: the training core's own one-line error (e.g. "training diverged at epoch 0: …") when
    the log tail has one."""
    tail = getattr(exc, "log_tail", "") or ""
    doc = {"type": type(exc).__name__, "message": exc.message, "exit_code": exc.exit_code}
    reason = next((line.split(CORE_ERROR, 1)[1] for line in reversed(tail.splitlines()) if CORE_ERROR in line), None)
    if reason:
        doc["reason"] = reason.strip()
    if tail:
        doc["log_tail"] = tail
    return doc


def _say_event(event: dict) -> None:
    if event.get("event") == "state":
        say(f"[{event['experiment_id']}] {event['state']}")


def _metrics(exp_dir: Path) -> dict:
    import json

    try:
        metrics = json.loads((exp_dir / "metrics" / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return {"test": metrics.get("test"), "val": metrics.get("val"), "n": metrics.get("n")}


def _summary(record: dict, exp_dir: Path) -> dict:
    keys = ("experiment_id", "state", "attempt", "backend", "container_id", "image", "image_id", "exit_code", "message")
    return {**{k: record.get(k) for k in keys}, "exp_dir": str(exp_dir), **_metrics(exp_dir)}


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

    from runner import engine, images
    from runner.launch import decide_image

    if dry_run and base:
        root = images.source_root()
        spec = images.plan_base_build(
            root,
            base_image=os.environ.get("INFRA_BASE_OS") or None,
            torch_spec=os.environ.get("INFRA_TORCH_SPEC") or None,
            wheelhouse=images.default_wheelhouse(root),
        )
        (emit_json(spec.describe()) if json_out else typer.echo(_describe(spec.describe())))
        return
    client = engine.get_client()
    if base:
        ref = images.ensure_base_image(
            client,
            base_image=os.environ.get("INFRA_BASE_OS") or None,
            torch_spec=os.environ.get("INFRA_TORCH_SPEC") or None,
            on_log=say,
            force=force,
        )
    else:
        wd = _workdir(workdir)
        decision = decide_image(client, wd, say)
        if dry_run:
            doc = {**decision.spec.describe(), "exists": decision.image_id is not None}
            (emit_json(doc) if json_out else typer.echo(_describe(doc)))
            return
        if decision.image_id and not force:
            ref = images.ImageRef(decision.spec.tag, decision.image_id, decision.spec.content_hash, built=False)
        else:
            ref = images.build(client, decision.spec, say)
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


def _describe(doc: dict) -> str:
    import json

    return json.dumps(doc, indent=2)
