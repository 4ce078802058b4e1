"""`infra submit`, `infra worker`, `infra queue status`, `infra node`: scale-out over Redis with RQ."""

from pathlib import Path
from typing import Annotated

import typer

from runner.cli import options
from runner.cli.options import BACKEND_OPT, JSON_OPT, WORKDIR_OPT, resolve_workdir
from runner.cli.output import echo, emit_json, say
from runner.run.backends import BackendName

REDIS_OPT = Annotated[
    str,
    typer.Option(
        "--redis",
        envvar="INFRA_REDIS_URL",
        help="Redis URL: redis://[:PASSWORD@]HOST:PORT/DB, rediss:// for TLS (env INFRA_REDIS_URL).",
    ),
]

queue_app = typer.Typer(
    help="Inspect the Redis job queue.\n\nExample: infra queue status --redis redis://master:6379/0",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _optional_workdir(flag: Path | None) -> Path | None:
    from runner.workdir.store import get_workdir

    return resolve_workdir(flag) if flag is not None else get_workdir(required=False)


def submit(
    plan: Annotated[str, typer.Argument(help="Plan JSON file, or '-' to read it from stdin.")],
    redis_url: REDIS_OPT,
    queue: Annotated[str, typer.Option("--queue", help="Queue to put the job on.")] = "infra",
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a plan key: KEY=VALUE. Repeatable.")
    ] = None,
    retries: Annotated[
        int, typer.Option("--retries", min=0, help="Times a job whose worker died is retried on another worker.")
    ] = 3,
    json_out: JSON_OPT = False,
    workdir: WORKDIR_OPT = None,
) -> None:
    """Validate a plan here and put it on the queue; job id = experiment id, so duplicates are not enqueued.

    The database path is resolved to an absolute path on this machine and must be the same on the
    workers (shared filesystem). Prints the job id (with --json: job_id, experiment_id, queue,
    status, duplicate, replaced).

    Example: infra submit plan.json --redis redis://master:6379/0 --set train.seed=2
    """
    from runner.plan.load import load_plan
    from runner.queue.connection import connect
    from runner.queue.submit import submit as enqueue

    wd = _optional_workdir(workdir)
    loaded = load_plan(plan, overrides or [], workdir=wd)
    doc = enqueue(connect(redis_url), loaded.resolved, wd, queue_name=queue, retries=retries, source=loaded.source)
    if json_out:
        emit_json(doc)
    else:
        echo(doc["job_id"])
    if doc["duplicate"]:
        say(f"job {doc['job_id']} is already on queue {doc['queue']!r} ({doc['status']}); not enqueued again")
    else:
        again = " (replacing its failed job)" if doc["replaced"] else ""
        say(f"job {doc['job_id']} queued on {queue!r}{again}")


def worker(
    redis_url: REDIS_OPT,
    queues: Annotated[
        list[str] | None, typer.Option("--queue", help="Queue(s) to take jobs from, in priority order. Repeatable.")
    ] = None,
    gpus: Annotated[
        str | None,
        typer.Option(
            "--gpus",
            help='GPU slots: "0,1" runs one worker process per device, "all" one per GPU NVML sees, "none" CPU only; '
            "default: each plan's resources.gpus.",
        ),
    ] = None,
    burst: Annotated[bool, typer.Option("--burst", help="Exit once the queues are empty.")] = False,
    isolated: Annotated[
        bool,
        typer.Option(
            "--isolated",
            help="A fresh training process per job, not a warm slot kept between jobs of the same image and database.",
        ),
    ] = False,
    backend: BACKEND_OPT = BackendName.docker,
    name: Annotated[str | None, typer.Option("--name", help="Worker name (default HOST.PID).")] = None,
    heartbeat_ttl: Annotated[
        int,
        typer.Option(
            "--heartbeat-ttl",
            min=2,
            help="Seconds without a heartbeat after which this worker's job is retried elsewhere.",
        ),
    ] = 60,
    stop_timeout: Annotated[
        int, typer.Option("--stop-timeout", help="Seconds a stopped training gets to checkpoint.")
    ] = 60,
    workdir: WORKDIR_OPT = None,
) -> None:
    """Run queued plans through the same run path as 'infra run', one job at a time per GPU slot.

    No job timeout. The first SIGTERM finishes the current job and exits; the second stops the
    training gracefully (checkpoint) and puts the job back on the queue. A worker that dies stops
    heartbeating, and its job is retried on another worker, resuming from its checkpoint.

    Only infra's own job function runs: any other job is failed, and nothing of it is run.
    Whoever can write to the Redis server can run plans on this worker: give Redis a password or
    ACL user, TLS and a private bind address (docs/security.md); the worker warns when the
    URL has no credentials and is not loopback or a unix socket.

    Example: infra worker --redis redis://infra:PASSWORD@master:6379/0 --gpus 0,1
    """
    import logging
    import socket

    from runner.queue.connection import DEFAULT_QUEUE, exposure_warning
    from runner.queue.pool import gpu_slots, run_pool

    warning = exposure_warning(redis_url)
    if warning:
        say(f"infra: warning: {warning}")
    wd = resolve_workdir(workdir)
    for logger in ("runner", "rq.worker"):
        if logging.getLogger(logger).getEffectiveLevel() > logging.INFO:
            logging.getLogger(logger).setLevel(logging.INFO)
    slots = gpu_slots(gpus)
    if len(slots) > 1:
        argv = ["worker", "--redis", redis_url, "--backend", str(backend), "--workdir", str(wd)]
        for queue in queues or [DEFAULT_QUEUE]:
            argv += ["--queue", queue]
        argv += ["--heartbeat-ttl", str(heartbeat_ttl), "--stop-timeout", str(stop_timeout)]
        if burst:
            argv.append("--burst")
        if isolated:
            argv.append("--isolated")
        say(f"starting {len(slots)} workers, one per GPU: {', '.join(slots)}")
        raise typer.Exit(run_pool(argv, slots, name or socket.gethostname()))
    from runner.plan.models import GpuRequest
    from runner.queue.worker import WorkerConfig, run_worker

    cfg = WorkerConfig(
        redis_url=redis_url,
        workdir=wd,
        queues=list(queues or [DEFAULT_QUEUE]),
        gpus=None if slots[0] is None else GpuRequest.parse(slots[0], "--gpus", devices_only=True),
        backend=options.backend(backend),
        burst=burst,
        name=name,
        heartbeat_ttl=heartbeat_ttl,
        stop_timeout=stop_timeout,
        isolated=isolated,
    )
    run_worker(cfg)


@queue_app.command("status")
def status(
    redis_url: REDIS_OPT,
    queues: Annotated[list[str] | None, typer.Option("--queue", help="Only these queues. Repeatable.")] = None,
    json_out: JSON_OPT = False,
) -> None:
    """Jobs per queue (queued, started, finished, failed) and each worker's state, job and last heartbeat.

    A heartbeat or worker record in Redis that is not what infra writes is skipped with a note.

    Example: infra queue status --redis redis://master:6379/0 --json
    """
    from runner.queue.connection import connect
    from runner.queue.status import printable, queue_status

    doc = queue_status(connect(redis_url), queues)
    if json_out:
        emit_json(doc)
    else:
        echo(f"{'QUEUE':20} {'QUEUED':>7} {'STARTED':>7} {'FINISHED':>8} {'FAILED':>6}")
        for row in doc["queues"]:
            echo(
                f"{printable(row['name']):20} {row['queued']:>7} {row['started']:>7} {row['finished']:>8} "
                f"{row['failed']:>6}"
            )
        echo("")
        echo(f"{'WORKER':32} {'STATE':10} {'ALIVE':5} {'JOB':32} LAST HEARTBEAT")
        for w in doc["workers"]:
            echo(
                f"{printable(w['name'] or '-'):32} {printable(w['state'] or '-'):10} "
                f"{'yes' if w['alive'] else 'no':5} {printable(w['current_job'] or '-'):32} "
                f"{printable(w['last_heartbeat'] or '-')}"
            )
    for note in doc["notes"]:
        say(f"infra: note: {note}")


def node(json_out: JSON_OPT = False, workdir: WORKDIR_OPT = None) -> None:
    """This node's resources: GPUs (NVML), CPUs, memory, disk free under the workdir, Docker engine,
    the model store (path, model count) and the workdir's embedding cache size.

    A missing NVML or an unreachable Docker engine is reported in the output, not an error.

    Example: infra node --json
    """
    from runner.node import node_info

    doc = node_info(_optional_workdir(workdir))
    if json_out:
        emit_json(doc)
        return
    gib = 2**30
    mem, disk, dock = doc["memory"], doc["disk"], doc["docker"]
    echo(f"host      {doc['hostname']} (infra {doc['infra_version']}, python {doc['python']})")
    echo(f"cpus      {doc['cpus']} ({doc['cpus_usable']} usable)")
    if mem.get("total_bytes"):
        echo(f"memory    {mem['available_bytes'] / gib:.1f} GiB available of {mem['total_bytes'] / gib:.1f} GiB")
    if "free_bytes" in disk:
        echo(f"disk      {disk['free_bytes'] / gib:.1f} GiB free under {disk['path']}")
    for gpu in doc["gpus"]:
        util = gpu["utilization_percent"]
        echo(
            f"gpu {gpu['index']}     {gpu['name']}, {gpu['memory_used_bytes'] / gib:.1f}/"
            f"{gpu['memory_total_bytes'] / gib:.1f} GiB, {util if util is not None else '?'}% busy, "
            f"{len(gpu['processes'])} processes"
        )
    if doc.get("gpu_note"):
        echo(f"gpus      none ({doc['gpu_note']})")
    if dock.get("reachable"):
        echo(
            f"docker    {dock['server_version']}, GPU runtime {'yes' if dock['gpu_runtime'] else 'no'} "
            f"(runtimes: {', '.join(dock['runtimes'])})"
        )
    else:
        echo(f"docker    unreachable: {dock.get('error')}")
    store, cache = doc["model_store"], doc["embed_cache"]
    if store.get("path") is None:
        echo("models    no model store (infra config set model_store PATH)")
    elif "error" in store:
        echo(f"models    {store['path']}: {store['error']}")
    else:
        echo(f"models    {store['models']} in {store['path']}")
    if cache:
        echo(f"cache     {cache['bytes'] / 2**20:.1f} MiB of embeddings in {cache['path']}")
