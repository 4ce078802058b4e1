"""The `--sweep` branch of `infra run`: parse, validate every point, run or submit, render the summary."""

from pathlib import Path

import typer

from runner.cli.output import emit_json, say
from runner.cli.progress import RunView


def run_sweep_command(
    plan: str,
    sweeps: list[str],
    overrides: list[str],
    *,
    gpus: str | None,
    detach: bool,
    backend: str,
    rerun: bool,
    stop_timeout: int,
    events: bool,
    json_out: bool,
    view: str,
    workdir: Path,
    submit: bool,
    redis_url: str | None,
    queue: str,
) -> None:
    """Expand the grid, then run its points one after another (or submit them); exit with the worst code.

    Each point is shown by the same progress view as a single run (`view`: a runner.cli.progress
    mode), headed by its index and values; the summary table follows the last one."""
    from runner.errors import UsageError
    from runner.plan.document import STDIN, read_plan_text
    from runner.run import sweep
    from runner.run.launch import RunOptions

    if detach:
        raise UsageError("--detach does not go with --sweep (the grid runs one after another); use --submit")
    if events:
        raise UsageError("--events does not go with --sweep; use --json for one summary document")
    if submit and not redis_url:
        raise UsageError("--submit needs --redis URL (or INFRA_REDIS_URL)")
    points = sweep.grid(sweeps)
    keys = list(points[0])
    text = read_plan_text(plan)[0] if plan == STDIN else None
    loaded = sweep.load_points(plan, text, overrides, points, workdir)

    if submit:
        docs = sweep.submit_sweep(loaded, points, workdir, redis_url, queue)
        if json_out:
            emit_json({"experiments": docs})
        for doc in docs:
            state = f"already {doc['status']}" if doc["duplicate"] else "queued"
            say(f"[{doc['index']}/{len(docs)}] {sweep.label(doc['values'])}: job {doc['job_id']} {state} on {queue!r}")
        return

    views: list[RunView] = []

    def make_opts() -> RunOptions:
        index = len(views)
        title = f"[{index + 1}/{len(points)}] {sweep.label(points[index])}"
        views.append(RunView(view, workdir, title=None if view == "quiet" else title))
        return RunOptions(backend=backend, gpus=gpus, rerun=rerun, stop_timeout=stop_timeout, **views[-1].options())

    def on_done(result: sweep.PointResult, total: int) -> None:
        if views:
            views[-1].stop()
        if json_out:
            return
        if view == "quiet":  # the table is the result; a point's error is still shown
            if result.message and result.state != "succeeded":
                say(f"[{result.index}/{total}] {result.experiment_id or '-'} {result.state}: {result.message}")
            return
        reused = " (already succeeded, not rerun)" if result.reused else ""
        spearman = result.test.get("spearman")
        score = f", test spearman {spearman:.4f}" if isinstance(spearman, float) else ""
        say(
            f"[{result.index}/{total}] {sweep.label(result.values)}: {result.experiment_id or '-'} "
            f"{result.state}{reused}{score}"
        )
        if result.message and result.state != "succeeded":
            say(f"  {result.message}")

    if view != "quiet":
        say(f"sweep: {len(points)} experiment(s) over {', '.join(keys)}")
    try:
        results, code = sweep.run_sweep(loaded, points, workdir, make_opts, on_done)
    finally:
        for point_view in views:
            point_view.stop()
    if json_out:
        emit_json({"experiments": [r.to_dict() for r in results], "exit_code": code})
    else:
        typer.echo(sweep.summary_table(results, keys))
    if code:
        raise typer.Exit(code)
