"""`infra rm` and `infra prune`: delete experiments of the workdir and infra's unused images."""

from typing import Annotated

import typer

from runner.cli.experiments import complete_experiment_ids, resolve_experiment
from runner.cli.options import JSON_OPT, WORKDIR_OPT, resolve_workdir
from runner.cli.output import emit_json, say

DRY_RUN_OPT = Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed and its size.")]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def rm(
    ids: Annotated[
        list[str],
        typer.Argument(
            help="Experiment ids (from 'infra ls'), or unique prefixes of them.", autocompletion=complete_experiment_ids
        ),
    ],
    force: Annotated[
        bool, typer.Option("--force", help="Stop a running experiment first (gracefully, as 'infra stop').")
    ] = False,
    dry_run: DRY_RUN_OPT = False,
    json_out: JSON_OPT = False,
    workdir: WORKDIR_OPT = None,
) -> None:
    """Delete experiments of the workdir: their directories and lock files.

    Every id is checked before anything is deleted: an unknown id exits 4, an ambiguous prefix or an
    active experiment exits 2 (unless --force). Links are never followed. With --json: {"dry_run": ..., "experiments":
    [{experiment_id, state, bytes, removed, stopped}]}.

    Example: infra rm blat-demo-3f2a9c01de blat-demo-9e1b0c44aa --dry-run
    """
    from runner.run.housekeeping import remove_experiments

    wd = resolve_workdir(workdir)
    removals = remove_experiments(wd, [resolve_experiment(wd, i) for i in ids], force=force, dry_run=dry_run)
    if json_out:
        emit_json({"dry_run": dry_run, "experiments": [r.to_dict() for r in removals]})
    verb = "would remove" if dry_run else "removed"
    for r in removals:
        say(f"{verb} {r.experiment_id} ({r.state}, {_size(r.bytes)})" + (" after stopping it" if r.stopped else ""))


def prune(
    older_than: Annotated[
        str | None,
        typer.Option("--older-than", help="Finished more than this long ago: 30m, 12h, 7d (default 30d)."),
    ] = None,
    before: Annotated[
        str | None,
        typer.Option("--before", help="Finished before this ISO time, e.g. 2026-11-01 (not with --older-than)."),
    ] = None,
    state: Annotated[
        list[str] | None,
        typer.Option("--state", help="Only these finished states (repeatable): succeeded, failed, cancelled, lost."),
    ] = None,
    images: Annotated[
        bool,
        typer.Option(
            "--images",
            help="Also remove dangling infra images and infra images built before the cutoff that nothing uses.",
        ),
    ] = False,
    cache: Annotated[
        bool,
        typer.Option(
            "--cache", help="Also empty the workdir's embedding cache (cache/embeddings; recomputed when needed)."
        ),
    ] = False,
    dry_run: DRY_RUN_OPT = False,
    json_out: JSON_OPT = False,
    workdir: WORKDIR_OPT = None,
) -> None:
    """Delete finished experiments (succeeded, failed, cancelled, lost) that ended before a cutoff.

    Running experiments and unreadable records are never pruned. With --images, only images with
    infra's labels are considered, and never one a container uses, a remaining experiment ran on,
    or a remaining image was built on. Sizes of images share layers: the bytes freed are at most
    their sum. With --cache, every entry of the workdir's embedding cache is removed (links never
    followed; the next plm experiment computes what it needs again). With --json: {"dry_run", "cutoff",
    "experiments": [...], "images": [{id, tags, size, reason, removed}], "cache": {path, entries: [{name,
    bytes, removed, busy?}], bytes} (with --cache), "bytes"}.

    Example: infra prune --older-than 14d --state failed --images --dry-run
    """
    from runner.run.housekeeping import prune_cache, prune_cutoff, prune_experiments, prune_images

    cutoff = prune_cutoff(older_than, before)
    wd = resolve_workdir(workdir)
    removals = prune_experiments(wd, cutoff, state or None, dry_run=dry_run)
    image_result = None
    if images:
        from runner import engine

        image_result = prune_images(
            engine.get_client(), wd, cutoff, dry_run=dry_run, leaving={r.experiment_id for r in removals}
        )
    cache_result = prune_cache(wd, dry_run=dry_run) if cache else None
    freed = sum(r.bytes for r in removals) + (image_result.bytes if image_result else 0)
    freed += cache_result.bytes if cache_result else 0
    if json_out:
        emit_json(
            {
                "dry_run": dry_run,
                "cutoff": cutoff.isoformat(),
                "experiments": [r.to_dict() for r in removals],
                "images": image_result.images if image_result else [],
                **({"cache": cache_result.to_dict()} if cache_result else {}),
                "bytes": freed,
            }
        )
    verb = "would remove" if dry_run else "removed"
    for r in removals:
        say(f"{verb} experiment {r.experiment_id} ({r.state}, {_size(r.bytes)})")
    for i in image_result.images if image_result else []:
        name = ", ".join(i["tags"]) or i["id"][:19]
        what = verb if dry_run or i["removed"] else "kept (in use)"
        say(f"{what} image {name} ({i['reason']}, {_size(i['size'])})")
    if cache_result is not None:
        busy = sum(1 for e in cache_result.entries if e.get("busy"))
        gone = len(cache_result.entries) - busy
        say(f"{verb} {gone} embedding cache file(s) in {cache_result.path} ({_size(cache_result.bytes)})")
        if busy:
            say(f"kept {busy} embedding cache file(s) an experiment is computing now (prune again when it ends)")
    kind = "experiment(s)" + (", images" if images else "") + (", the embedding cache" if cache else "")
    say(
        f"{len(removals)} {kind} {'to free' if dry_run else 'freed'}: {_size(freed)} (cutoff {cutoff:%Y-%m-%d %H:%M} UTC)"
    )
