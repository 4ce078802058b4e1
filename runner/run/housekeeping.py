"""`infra rm` and `infra prune`: delete experiments of a workdir and infra's unused images.

An experiment directory is written by code the host does not trust, so deletion never follows a
link: the entry under `experiments/` must be a real directory (checked with lstat), it is first
renamed aside inside `experiments/` (so it stops being an experiment at once, and a link swapped
in after the check is what gets renamed, not followed), then removed with `safefs.remove_entry`
relative to the open `experiments/` descriptor (iterative, one descriptor at a time, never through a
link: a tree as deep as a container can make it is removed like any other). The experiment's lock is
held meanwhile, so `infra run` of the same id cannot start half-way through. Sizes come from the same
kind of walk (`safefs.tree_bytes`).

Images: only those carrying `infra.kind`; never one a container (running or stopped) uses, one a
kept experiment ran on, or a base image a kept plugin image was built on. Sizes are the engine's
per-image sizes; images share layers, so the bytes freed are at most their sum.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from runner import safefs
from runner.errors import EnvironmentProblem, UnknownExperiment, UsageError
from runner.run.records import ACTIVE, TERMINAL, Experiment, RecordError, all_experiments, experiments_root, find

log = logging.getLogger(__name__)

REMOVING_PREFIX = ".removing-"
LOCK_WAIT_S = 10


@dataclass
class Removal:
    """One experiment `rm`/`prune` deletes (or would, with --dry-run)."""

    experiment_id: str
    state: str
    bytes: int
    removed: bool = False
    stopped: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ImagePrune:
    """What `prune --images` removes: rows {id, tags, size, reason, removed}; with `dry_run` none is removed."""

    dry_run: bool
    images: list[dict] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        """At most this many bytes freed (or to be freed): the images share layers."""
        return sum(i["size"] for i in self.images if i["removed"] or self.dry_run)


def check_real_dir(exp: Experiment) -> None:
    """UsageError unless the experiment's entry under experiments/ is a directory itself, not a link."""
    try:
        mode = os.lstat(exp.root).st_mode
    except FileNotFoundError:
        raise UnknownExperiment(f"no experiment {exp.id!r} in {exp.root.parent}; list them with 'infra ls'") from None
    if not stat.S_ISDIR(mode):
        raise UsageError(
            f"{exp.root} is not a directory (a link or a file); remove it by hand after checking what it is"
        )


def delete_experiment_dir(exp: Experiment) -> None:
    """Remove the experiment's directory and lock files without following any link (see the module doc)."""
    root = exp.root.parent
    parent_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.stat(exp.id, dir_fd=parent_fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(
                f"{exp.root} is not a directory (a link or a file); remove it by hand after checking what it is"
            )
        aside = f"{REMOVING_PREFIX}{exp.id}-{secrets.token_hex(4)}"
        os.rename(exp.id, aside, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        moved = os.stat(aside, dir_fd=parent_fd, follow_symlinks=False)
        if not stat.S_ISDIR(moved.st_mode) or moved.st_ino != st.st_ino:
            raise UsageError(f"{exp.root} changed while it was being removed; left as {root / aside}")
        safefs.remove_entry(parent_fd, aside, root / aside)
    finally:
        os.close(parent_fd)
    for lock in (exp.lock_path, exp.lock_path.with_name(f"{exp.id}.final.lock")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)


def _state(exp: Experiment) -> str:
    from runner.run.reconcile import reconcile

    try:
        return reconcile(exp)["state"]
    except RecordError:
        return "unreadable"


def remove_experiments(
    workdir: Path, ids: list[str], force: bool = False, dry_run: bool = False, stop_timeout: int = 30
) -> list[Removal]:
    """Delete the experiments `ids` of `workdir`. Every id is checked first: an unknown one raises
    UnknownExperiment (exit 4) and an active one UsageError (exit 2) unless `force`, which stops it
    first; nothing is deleted when a check fails."""
    from filelock import FileLock, Timeout

    from runner.run.launch import stop_experiment

    if not ids:
        raise UsageError("infra rm: give at least one experiment id (see 'infra ls')")
    exps = [find(workdir, i) for i in dict.fromkeys(ids)]
    for exp in exps:
        check_real_dir(exp)
    states = {e.id: _state(e) for e in exps}
    active = [i for i, s in states.items() if s in ACTIVE]
    if active and not force:
        raise UsageError(
            f"experiment {', '.join(active)} is {states[active[0]]}; stop it with 'infra stop' first, "
            "or use 'infra rm --force' to stop and remove it"
        )
    out = [Removal(e.id, states[e.id], safefs.tree_bytes(e.root)) for e in exps]
    if dry_run:
        return out
    for exp, removal in zip(exps, out, strict=True):
        if removal.state in ACTIVE:
            removal.state = stop_experiment(exp, timeout=stop_timeout, reason="stopped by 'infra rm --force'")["state"]
            removal.stopped = True
        exp.lock_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(exp.lock_path), timeout=LOCK_WAIT_S):
                if _state(exp) in ACTIVE:  # restarted meanwhile by another `infra run`
                    raise UsageError(f"experiment {exp.id} was started again while being removed; it is kept")
                delete_experiment_dir(exp)
        except Timeout:
            raise EnvironmentProblem(
                f"experiment {exp.id} is locked by another infra command (lock {exp.lock_path}); try again later"
            ) from None
        removal.removed = True
    return out


AGE = re.compile(r"([0-9]{1,9})([smhd])")
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def prune_cutoff(older_than: str | None, before: str | None, now: datetime | None = None) -> datetime:
    """The cutoff of `infra prune` (pure): `--older-than AGE` (30m, 12h, 7d; default 30d) before
    `now`, or `--before TIME` (ISO date or time, UTC unless it says otherwise)."""
    now = now or datetime.now(UTC)
    if older_than is not None and before is not None:
        raise UsageError("--older-than and --before name the same cutoff; give one of them")
    if before is not None:
        if AGE.fullmatch(before):
            raise UsageError(f"--before {before!r}: give a time like 2026-11-01 (for an age use --older-than {before})")
        try:
            parsed = datetime.fromisoformat(before.replace("Z", "+00:00"))
        except ValueError:
            raise UsageError(
                f"--before {before[:40]!r}: use an ISO date or time, like 2026-11-01 or 2026-11-01T10:00"
            ) from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    age = AGE.fullmatch(older_than or "30d")
    if not age:
        raise UsageError(f"--older-than {older_than[:40]!r}: give an age like 30m, 12h or 7d (for a date use --before)")
    try:
        return now - timedelta(seconds=int(age.group(1)) * AGE_UNITS[age.group(2)])
    except OverflowError:
        raise UsageError(f"--older-than {older_than}: reaches back before year 1; give a smaller age") from None


def _when(record: dict) -> datetime | None:
    for key in ("finished_at", "updated_at", "created_at"):
        value = record.get(key)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
                return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def prune_candidates(workdir: Path, cutoff: datetime, states: list[str] | None = None) -> list[Experiment]:
    """Finished experiments (TERMINAL states, or only `states`) whose end lies before `cutoff`.

    An unreadable record is never pruned: nobody can tell what it is (remove it with `infra rm`).
    """
    wanted = set(states or TERMINAL)
    bad = wanted - TERMINAL
    if bad:
        raise UsageError(
            f"--state {sorted(bad)[0]!r}: prune removes finished experiments only; use {', '.join(sorted(TERMINAL))}"
        )
    out = []
    for exp in all_experiments(workdir):
        try:
            record = exp.read()
        except (RecordError, UnknownExperiment):
            continue
        when = _when(record)
        if record["state"] in wanted and when is not None and when < cutoff:
            out.append(exp)
    return out


def prune_experiments(
    workdir: Path, cutoff: datetime, states: list[str] | None = None, dry_run: bool = False
) -> list[Removal]:
    exps = prune_candidates(workdir, cutoff, states)
    if not exps:
        return []
    return remove_experiments(workdir, [e.id for e in exps], force=False, dry_run=dry_run)


def kept_image_ids(workdir: Path, leaving: set[str] = frozenset()) -> set[str]:
    """Image ids the workdir's experiments ran on (from their records), except those `leaving`."""
    ids = set()
    if not experiments_root(workdir).is_dir():
        return ids
    for exp in all_experiments(workdir):
        if exp.id in leaving:
            continue
        with contextlib.suppress(RecordError, UnknownExperiment):
            image_id = exp.read().get("image_id")
            if isinstance(image_id, str):
                ids.add(image_id)
    return ids


def other_workdirs(workdir: Path | None) -> list[Path]:
    """The other workdirs this user ran experiments in (`runner.workdir.known`) that still exist."""
    from runner.workdir.known import known_workdirs

    here = Path(workdir).resolve() if workdir is not None else None
    return [wd for wd in known_workdirs() if wd != here and experiments_root(wd).is_dir()]


def plan_image_prune(images: list[dict], in_use: set[str], kept: set[str], cutoff: datetime) -> list[dict]:
    """Which infra images to remove (pure): dangling ones of any age and tagged ones built before
    `cutoff`, unless a container uses them, a kept experiment ran on them, or a remaining image was
    built on them (`infra.base_image`). Each chosen row gains a `reason`."""
    from runner.images.builds import LABEL_BASE_IMAGE

    limit = cutoff.timestamp()
    chosen = []
    for image in images:
        if image["id"] in in_use or image["id"] in kept:
            continue
        if not image["tags"]:
            chosen.append({**image, "reason": "dangling"})
        elif image["created"] < limit:
            chosen.append({**image, "reason": "unused, built before the cutoff"})
    going = {i["id"] for i in chosen}
    bases = {i["labels"].get(LABEL_BASE_IMAGE) for i in images if i["id"] not in going}
    return [i for i in chosen if i["id"] not in bases]


def prune_images(
    client,
    workdir: Path | None,
    cutoff: datetime,
    dry_run: bool = False,
    leaving: set[str] = frozenset(),
    label: str = "infra.kind",
) -> ImagePrune:
    """Remove (or list, with `dry_run`) the infra images `plan_image_prune` chooses; the experiments
    `leaving` (pruned by the same command) do not keep theirs. `label` narrows the images considered
    (a test passes its own label so it never touches another image of a shared engine)."""
    from runner import engine

    images = engine.labelled_images(client, label)
    kept = kept_image_ids(workdir, leaving) if workdir is not None else set()
    for other in other_workdirs(workdir):  # the engine is the node's: so are the experiments that need it
        kept |= kept_image_ids(other)
    chosen = plan_image_prune(images, engine.container_image_ids(client), kept, cutoff)
    result = ImagePrune(dry_run)
    for image in chosen:
        row = {"id": image["id"], "tags": image["tags"], "size": image["size"], "reason": image["reason"]}
        if dry_run:
            row["removed"] = False
        else:
            row["removed"] = engine.delete_image(client, image)
        result.images.append(row)
    return result


@dataclass
class CachePrune:
    """What `prune --cache` removes from the workdir's embedding cache: rows {name, bytes, removed}."""

    path: Path
    dry_run: bool
    entries: list[dict] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(e["bytes"] for e in self.entries if e["removed"] or self.dry_run)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "entries": self.entries, "bytes": self.bytes}


def embed_cache(workdir: Path) -> Path:
    from runner.run.jobs import EMBED_CACHE

    return Path(workdir) / EMBED_CACHE


def cache_bytes(workdir: Path) -> int:
    """Bytes of the regular files in the workdir's embedding cache (0 when there is none; no link followed)."""
    return safefs.tree_bytes(embed_cache(workdir))


def _busy_keys(dir_fd: int) -> set[str]:
    """Cache keys whose `<key>.lock` (a regular file) another process holds: their features are being
    computed. Tried without blocking and released at once; a lock that is not a regular file is no
    lock (it is removed with the rest)."""
    import fcntl

    busy = set()
    for entry in os.scandir(dir_fd):
        if not entry.name.endswith(".lock") or not entry.is_file(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            busy.add(entry.name[: -len(".lock")])
        finally:
            os.close(fd)
    return busy


def prune_cache(workdir: Path, dry_run: bool = False) -> CachePrune:
    """Empty the workdir's embedding cache (`cache/embeddings`): every entry removed with
    `safefs.remove_entry` relative to the open cache folder, nothing followed (the training containers
    write there); the folder itself stays (running containers have it mounted). The files of a key
    whose `<key>.lock` an experiment holds (it is computing them) are left alone and listed as `busy`."""
    from runner.run.jobs import EMBED_CACHE

    where = embed_cache(workdir)
    result = CachePrune(where, dry_run)
    with contextlib.ExitStack() as stack:
        try:
            fd = stack.enter_context(safefs.open_dir(workdir, EMBED_CACHE))
        except FileNotFoundError:
            return result
        busy = _busy_keys(fd)
        for entry in sorted(os.scandir(fd), key=lambda e: e.name):
            if any(key in entry.name for key in busy):
                result.entries.append({"name": entry.name, "bytes": 0, "removed": False, "busy": True})
                continue
            st = entry.stat(follow_symlinks=False)
            size = safefs.tree_bytes(where / entry.name) if stat.S_ISDIR(st.st_mode) else st.st_size
            if stat.S_ISLNK(st.st_mode):
                size = 0  # what a link points at is not the cache's
            if not dry_run:
                safefs.remove_entry(fd, entry.name, where / entry.name)
            result.entries.append({"name": entry.name, "bytes": size, "removed": not dry_run})
    return result
