"""The `--sweep` branch of `infra run`: parse, validate every point, run the study or submit it, render the summary."""

import threading
from pathlib import Path

import typer

from runner.cli.output import echo, emit_json, say
from runner.cli.progress import RunView
from runner.lines import terminal_safe


class StudyBoard:
    """Several points at once on a terminal: one live table of the points (state, test Spearman,
    training seconds) redrawn as they start and end; the summary table follows it."""

    def __init__(self, total: int, labels: list[str], console=None):
        from rich.console import Console
        from rich.live import Live

        self.rows = {i: [i, label, "pending", None, None] for i, label in enumerate(labels, 1)}
        self.total = total
        self.console = console or Console(stderr=True)
        self.lock = threading.Lock()
        self.live = Live(self._table(), console=self.console, transient=True, auto_refresh=False)
        self.live.start()

    def _table(self):
        from rich.table import Table

        done = sum(r[2] not in ("pending", "running") for r in self.rows.values())
        table = Table(title=f"study: {done}/{self.total} done", title_justify="left")
        for name in ("#", "point", "state", "test.spearman", "train s"):
            table.add_column(name, justify="right" if name in ("#", "test.spearman", "train s") else "left")
        for index, label, state, rho, seconds in self.rows.values():
            table.add_row(str(index), label, state, "-" if rho is None else f"{rho:.4f}",
                          "-" if seconds is None else f"{seconds:.1f}")  # fmt: skip
        return table

    def update(self, index: int, state: str, rho=None, seconds=None) -> None:
        with self.lock:
            self.rows[index][2:] = [state, rho, seconds]
            self.live.update(self._table(), refresh=True)

    def stop(self) -> None:
        self.live.stop()


def dry_run_table(doc: dict, keys: list[str]) -> str:
    """The grid a dry run found: one row per point (its values, label, id, what would happen)."""
    from runner.run import sweep
    from runner.run.compare import render_table

    rows = [[p["index"], *[sweep.show(p["values"][k]) for k in keys], p["label"], p["experiment_id"] or "-",
             p["action"]] for p in doc["points"]]  # fmt: skip
    table = render_table(["#", *keys, "point", "experiment", "would"], rows)
    note = "" if doc.get("components_checked") else "\n(components not checked: the image does not exist yet)"
    head = f"study {doc['study_id']}: " if doc.get("study_id") else ""
    return f"{head}{len(rows)} point(s), backend {doc['backend']}\n{table}{note}"


def run_sweep_command(
    plan: str,
    sweeps: list[str],
    overrides: list[str],
    *,
    gpus,
    detach: bool,
    backend,
    rerun: bool,
    stop_timeout: int,
    events: bool,
    json_out: bool,
    view: str,
    workdir: Path,
    submit: bool,
    redis_url: str | None,
    queue: str,
    parallel: int | None = None,
    isolated: bool = False,
    dry_run: bool = False,
) -> None:
    """Expand the grid, then run it as a study (`runner.run.study`) or submit it; exit with the worst code.

    With one slot each point is shown by the same progress view as a single run, headed by its
    index and values; with several, one line per point as it starts and ends. The summary table
    follows the last point."""
    from runner.errors import UsageError
    from runner.plan.document import STDIN, read_plan_text
    from runner.run import sweep
    from runner.run.launch import plan_gpus
    from runner.run.study import StudyOptions, default_parallel, run_study

    if detach:
        raise UsageError("--detach does not go with --sweep (the study runs in this process); use --submit")
    if events:
        raise UsageError("--events does not go with --sweep; use --json for one summary document")
    if submit and not redis_url:
        raise UsageError("--submit needs --redis URL (or INFRA_REDIS_URL)")
    if parallel is not None and parallel < 1:
        raise UsageError(f"--parallel {parallel}: use a number of slots of at least 1")
    points = sweep.grid(sweeps)
    keys = list(points[0])
    text = read_plan_text(plan)[0] if plan == STDIN else None
    loaded = sweep.load_points(plan, text, overrides, points, workdir)

    if dry_run:
        from runner.run.study import dry_run_study

        doc = dry_run_study(loaded, points, workdir, StudyOptions(backend=backend, gpus=gpus, rerun=rerun))
        if json_out:
            emit_json(doc)
        else:
            echo(dry_run_table(doc, keys))
        return
    if submit:
        docs = sweep.submit_sweep(loaded, points, workdir, redis_url, queue)
        if json_out:
            emit_json({"experiments": docs})
        for doc in docs:
            state = f"already {doc['status']}" if doc["duplicate"] else "queued"
            say(f"[{doc['index']}/{len(docs)}] {sweep.label(doc['values'])}: job {doc['job_id']} {state} on {queue!r}")
        return

    slots = min(parallel or default_parallel(plan_gpus(loaded[0], gpus)), len(points))
    views: dict[int, RunView] = {}
    board = StudyBoard(len(points), [sweep.point_label(p) for p in points]) if slots > 1 and view == "live" else None

    def point_view(result: sweep.PointResult) -> dict:
        title = f"[{result.index}/{len(points)}] {sweep.label(result.values)}"
        if board is not None:
            board.update(result.index, "running")
            return {}
        if slots > 1:  # several points at once: a line as each starts, none of their epochs
            if view != "quiet":
                say(f"{title}: {result.experiment_id} started")
            return {}
        views[result.index] = RunView(view, workdir, title=None if view == "quiet" else title)
        return views[result.index].options()

    def on_done(result: sweep.PointResult, total: int) -> None:
        if result.index in views:
            views.pop(result.index).stop()
        if board is not None:
            state = result.state + (" (reused)" if result.reused else "")
            board.update(result.index, state, result.test.get("spearman"), result.training_seconds)
            if result.message and result.state != "succeeded":
                board.console.print(f"[{result.index}/{total}] {result.experiment_id or '-'} {result.state}: "
                                    f"{terminal_safe(result.message)}", markup=False, highlight=False)  # fmt: skip
            return
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
        how = "one process per point" if isolated else f"{slots} slot{'s' if slots > 1 else ''}"
        say(f"sweep: {len(points)} experiment(s) over {', '.join(keys)}; {how}")
    opts = StudyOptions(
        backend=backend, gpus=gpus, parallel=slots, rerun=rerun, stop_timeout=stop_timeout, isolated=isolated,
        point_view=point_view, on_done=on_done, on_build_log=say if view == "verbose" else (lambda line: None),
    )  # fmt: skip
    try:
        results, code, study = run_study(loaded, points, workdir, opts)
    finally:
        for point_view_ in views.values():
            point_view_.stop()
        if board is not None:
            board.stop()
    if json_out:
        emit_json({"study_id": study, "experiments": [r.to_dict() for r in results], "exit_code": code})
    else:
        echo(sweep.summary_table(results, keys))
        if study:
            say(f"study {study}: {sum(r.state == 'succeeded' for r in results)}/{len(results)} succeeded")
    if code:
        raise typer.Exit(code)
