"""What the training core is asked to do, as one typed value a backend runs: `CoreJob`.

Every run of the core, whatever it does (train an experiment, predict, list plugins, serve a study
slot), is a `CoreJob`: the core module to run, its arguments, every host path it reads or writes
(`Place`: the host path and where a container sees it), its limits, its GPUs and its labels. The
job builders here are pure; a backend turns a job into what it starts (the docker backend a
`runner.run.spec.ContainerSpec`, the local backend an argv and an environment), and nothing else
looks at which backend runs it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from runner.plan.models import GpuRequest

CONTAINER_EXP = "/exp"
CONTAINER_DATA = "/data"
CONTAINER_WORKDIR = "/workdir"
CONTAINER_SLOT = "/slot"
CONTAINER_MODELS = "/models"
CONTAINER_EMBED_CACHE = "/cache/embeddings"
EMBED_CACHE = "cache/embeddings"  # under the workdir: the plm embedding's cache, shared by its experiments
PREDICT_IN = "/in"
PREDICT_OUT = "/out"
# The longest template prediction accepts (config/predict.json is the training's output, i.e. plugin
# code's): titin, the longest known protein, has about 35,000 residues.
PREDICT_MAX_TEMPLATE = 1 << 16

Verb = Literal["train", "predict", "plugins", "slot"]


@dataclass(frozen=True)
class Place:
    """A host path the core reads (`read_only`) or writes, and where it is inside a container."""

    host: Path
    inside: str
    read_only: bool = True


@dataclass(frozen=True)
class Limits:
    """The core process's share of the node: container limits, and torch's thread count."""

    memory: str | None = None
    cpus: float | None = None
    shm_size: str | None = None
    network: str = "none"
    threads: int | None = None  # torch intra-op threads (INFRA_THREADS); None: torch's default

    @classmethod
    def from_resources(cls, resources, threads: int | None = None) -> Limits:
        """From a plan's typed `resources`; the threads follow `resources.cpus` unless given."""
        cpus = resources.cpus
        if threads is None and cpus:
            threads = max(1, math.floor(cpus))
        return cls(resources.memory, cpus, resources.shm_size, resources.network, threads)


@dataclass(frozen=True)
class CoreJob:
    """One run of the training core (see the module docstring).

    `args` mixes plain strings with `Place`s, which each backend renders as the path the core sees.
    `places` are what a container mounts, exactly; a `Place` in `args` that is not among them is a
    folder whose parts are (the experiment, whose output folders are mounted one by one) or one the
    image has (the workdir's plugins, copied into the plugin image). `image`/`image_id` say which image a container runs (the docker backend
    needs them; a host process ignores them).
    """

    verb: Verb
    module: str
    args: tuple[str | Place, ...]
    places: tuple[Place, ...]
    workdir: Path
    name: str
    experiment_id: str | None = None
    gpus: GpuRequest = field(default_factory=GpuRequest)
    limits: Limits = field(default_factory=Limits)
    labels: dict[str, str] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    image: str | None = None
    image_id: str | None = None
    timeout_s: float | None = None  # run_once: the most seconds the core may take
    log_limit: int | None = None  # bytes of output kept (None: the node's log limit)
    env_places: tuple[tuple[str, Place], ...] = ()  # variables naming a Place, rendered as the core sees it

    def argv(self, inside: bool) -> list[str]:
        """`python -m MODULE ARGS` with each Place as the path the core sees (`inside` a container or not)."""
        rendered = [(a.inside if inside else str(a.host)) if isinstance(a, Place) else a for a in self.args]
        return ["python", "-m", self.module, *rendered]

    def with_image(self, image: str | None, image_id: str | None) -> CoreJob:
        from dataclasses import replace

        return replace(self, image=image, image_id=image_id)


def core_environment(job: CoreJob, inside: bool = True) -> dict[str, str]:
    """The variables every core process gets, whatever runs it; a `Place` variable as the path the core
    sees (`inside` a container or not)."""
    env = {"PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", **job.environment}
    env.update((name, place.inside if inside else str(place.host)) for name, place in job.env_places)
    if job.experiment_id:
        env["INFRA_EXPERIMENT_ID"] = job.experiment_id
    if job.limits.threads:
        env["INFRA_THREADS"] = str(job.limits.threads)
    return env


@dataclass(frozen=True)
class ModelPlaces:
    """What a job of a plan with the `plm` embedding gets: the node's whole model store read-only and
    the workdir's embedding cache read-write, each named by a variable (INFRA_MODEL_STORE,
    INFRA_EMBED_CACHE)."""

    store: Place
    cache: Place

    @property
    def places(self) -> tuple[Place, ...]:
        return (self.store, self.cache)

    @property
    def env(self) -> tuple[tuple[str, Place], ...]:
        return (("INFRA_MODEL_STORE", self.store), ("INFRA_EMBED_CACHE", self.cache))


def plm_places(plans, workdir: Path, settings=None, create: bool = True) -> ModelPlaces | None:
    """The `ModelPlaces` of jobs running `plans` (typed `Plan`s) when any of them uses the `plm`
    embedding, else None. EnvironmentProblem (exit 3) when no model store is set.

    `create` makes `<workdir>/cache/embeddings` when missing (never through a link; a dry run leaves
    it); the docker backend hands it to the container's user as it does the output folders.
    """
    from runner import modelstore, safefs

    if not any(modelstore.plan_model(plan.embeddings) is not None for plan in plans):
        return None
    store = modelstore.store_path(settings)
    if create:
        with safefs.open_dir(workdir, EMBED_CACHE, create=True):
            pass
    return ModelPlaces(Place(store, CONTAINER_MODELS), Place(workdir / EMBED_CACHE, CONTAINER_EMBED_CACHE, False))


def _with_models(models: ModelPlaces | None) -> tuple[tuple[Place, ...], tuple[tuple[str, Place], ...]]:
    return (models.places, models.env) if models is not None else ((), ())


def database_places(db: Path, folder: str = CONTAINER_DATA) -> tuple[Place, ...]:
    """The database file read-only, plus `-wal` and `-shm` when a WAL database has both (SQLite
    needs them to read its newest pages read-only); never the folder the database sits in."""
    target = f"{folder}/{db.name}"
    places = [Place(db, target)]
    side = [Path(f"{db}-wal"), Path(f"{db}-shm")]
    if all(p.is_file() and not p.is_symlink() for p in side):
        places += [Place(p, f"{target}{p.name[len(db.name) :]}") for p in side]
    return tuple(places)


def train_job(
    *,
    experiment_id: str,
    exp_root: Path,
    db: Path,
    workdir: Path,
    output_dirs: tuple[str, ...],
    gpus: GpuRequest,
    limits: Limits,
    labels: dict[str, str],
    name: str,
    models: ModelPlaces | None = None,
) -> CoreJob:
    """`infra-train`: the experiment's canonical plan, its output folders read-write, the database read-only
    (and with `models` the model store read-only and the embedding cache read-write).

    The plan keeps the host's database path (what the user reads in config/plan.json); `--db` says
    where the core finds the file.
    """
    extra, env_places = _with_models(models)
    outputs = tuple(Place(exp_root / d, f"{CONTAINER_EXP}/{d}", read_only=False) for d in output_dirs)
    dbs = database_places(db)
    plan = Place(exp_root / "config" / "plan.json", f"{CONTAINER_EXP}/config/plan.json", read_only=False)
    exp = Place(exp_root, CONTAINER_EXP, read_only=False)
    wd = Place(workdir, CONTAINER_WORKDIR)
    return CoreJob(
        verb="train",
        module="runner.core",
        args=(plan, "--exp-dir", exp, "--workdir", wd, "--db", dbs[0]),
        places=(*dbs, *outputs, *extra),
        workdir=workdir,
        name=name,
        experiment_id=experiment_id,
        gpus=gpus,
        limits=limits,
        labels=labels,
        env_places=env_places,
    )


def discovery_job(workdir: Path, labels: dict[str, str], name: str, timeout_s: float) -> CoreJob:
    """`python -m runner.core.plugins WORKDIR`: what the workdir's plugins register (read-only everything).

    Inside a container the plugins are the copies baked into the image, so nothing is mounted.
    """
    return CoreJob(
        verb="plugins",
        module="runner.core.plugins",
        args=(Place(workdir, CONTAINER_WORKDIR),),
        places=(),
        workdir=workdir,
        name=name,
        labels=labels,
        environment={"HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"},
        timeout_s=timeout_s,
    )


# A study slot (runner.run.slots on the host, runner.core.slot in the core) talks through files in its
# control folder, which the host writes and the core only reads, and marks each point's output.
SLOT_MARK = "@@infra-slot"  # `@@infra-slot begin SEQ ID` / `@@infra-slot end SEQ EXIT_CODE` on its own line
SLOT_ALIVE = "alive"  # touched by the host every few seconds; a slot whose host is gone stops
SLOT_QUIT = "quit"  # the host is done with the slot: it exits when idle
SLOT_ALIVE_INTERVAL_S = 1.0  # how often the host touches `alive` (node settings: how stale it may get)


def slot_point_file(seq: int) -> str:
    return f"point-{seq:06d}.json"


def slot_stop_file(seq: int) -> str:
    return f"stop-{seq:06d}"


def slot_job(
    *,
    slot_dir: Path,
    dbs: tuple[Path, ...],
    workdir: Path,
    name: str,
    gpus: GpuRequest,
    limits: Limits,
    labels: dict[str, str],
    idle_exit_s: float,
    alive_timeout_s: float,
    models: ModelPlaces | None = None,
) -> CoreJob:
    """`python -m runner.core.slot`: one long-lived core process that runs a study's points one by one.

    Mounted: every database of the study read-only (each in a folder of its own, so two databases
    of one name do not collide), the slot's control folder read-only and its points folder
    read-write (each point's output folders are moved in while it runs: `runner.run.slots`); with
    `models` (a point uses `plm`) the model store read-only and the embedding cache read-write.
    """
    extra, env_places = _with_models(models)
    control = Place(slot_dir / "control", f"{CONTAINER_SLOT}/control")
    points = Place(slot_dir / "points", f"{CONTAINER_SLOT}/points", read_only=False)
    db_places = tuple(p for i, db in enumerate(dbs) for p in database_places(db, f"{CONTAINER_DATA}/{i}"))
    return CoreJob(
        verb="slot",
        module="runner.core.slot",
        args=(
            "--control",
            control,
            "--workdir",
            Place(workdir, CONTAINER_WORKDIR),
            "--idle-exit",
            f"{idle_exit_s:g}",
            "--alive-timeout",
            f"{alive_timeout_s:g}",
        ),  # fmt: skip
        places=(*db_places, control, points, *extra),
        workdir=workdir,
        name=name,
        gpus=gpus,
        limits=limits,
        labels=labels,
        env_places=env_places,
    )


def default_threads(slots: int) -> int:
    """torch threads per slot when the plan gives no `resources.cpus`: the node's CPUs shared out."""
    return max(1, (os.cpu_count() or 1) // max(slots, 1))


# How each core entry point prints its one-line error (the reason a failed job gives the user).
CORE_ERROR_PREFIXES = {
    "train": "infra-train: error: ",
    "slot": "infra-train: error: ",
    "predict": "infra-predict: error: ",
    "plugins": "infra plugins: ",
}


def core_error(verb: Verb, output: str) -> str | None:
    """The last one-line error the core printed for a job of `verb` in `output`, without its prefix."""
    prefix = CORE_ERROR_PREFIXES[verb]
    for line in reversed(output.splitlines()):
        if prefix in line:
            return line.split(prefix, 1)[1].strip() or None
    return None


@dataclass(frozen=True)
class PredictMember:
    """One experiment of a prediction: its folder, the files the core reads from it (the checkpoint and
    the prediction state, relative to `exp_root`) and the fresh folder its result and summary go to."""

    experiment_id: str
    exp_root: Path
    checkpoint: str
    state_files: tuple[str, ...]
    out_dir: Path


def predict_job(
    *,
    members: tuple[PredictMember, ...],
    source: Path | None,
    result_name: str,
    summary_name: str,
    core_args: tuple[str, ...],
    workdir: Path,
    labels: dict[str, str],
    name: str,
    limits: Limits,
    timeout_s: float,
    models: ModelPlaces | None = None,
) -> CoreJob:
    """`python -m runner.core.predict`: each member's checkpoint and prediction state and the input
    read-only, each member's fresh output folder written; the image's filesystem read-only with a
    private /tmp. Several members (an ensemble's experiments of one image) are predicted one after
    another by the one process, each under `/exp/mI` and `/out/mI`; one member is `/exp` and `/out`.

    `limits` are the training's memory and CPUs (the plan's `resources`), never its network: a
    prediction always runs with network none. `timeout_s` bounds the whole run (`infra predict --timeout`).
    `models`: the model store and the embedding cache of a `plm` experiment (cached sequences are read,
    new ones computed and added).
    """
    if not members:
        raise ValueError("a prediction job needs at least one member")
    extra, env_places = _with_models(models)
    reads: list[Place] = []
    outs: list[Place] = []
    args: list[str | Place] = []
    for i, m in enumerate(members):
        exp_inside, out_inside = (
            (CONTAINER_EXP, PREDICT_OUT) if len(members) == 1 else (f"{CONTAINER_EXP}/m{i}", f"{PREDICT_OUT}/m{i}")
        )
        ckpt = Place(m.exp_root / m.checkpoint, f"{exp_inside}/{m.checkpoint}")
        reads += [ckpt, *(Place(m.exp_root / rel, f"{exp_inside}/{rel}") for rel in m.state_files)]
        outs.append(Place(m.out_dir, out_inside, read_only=False))
        exp = Place(m.exp_root, exp_inside)
        result = Place(m.out_dir / result_name, f"{out_inside}/{result_name}", read_only=False)
        summary = Place(m.out_dir / summary_name, f"{out_inside}/{summary_name}", read_only=False)
        if len(members) == 1:
            args += ["--exp-dir", exp, "--checkpoint", ckpt, "--out", result, "--summary", summary]
        else:
            args += ["--member", exp, ckpt, result, summary]
    args += list(core_args)
    if source is not None:
        # the suffixes keep .tsv / .csv.gz for the reader
        inside = Place(source, f"{PREDICT_IN}/input{''.join(source.suffixes[-2:])}")
        reads.append(inside)
        args += ["--input", inside]
    return CoreJob(
        verb="predict",
        module="runner.core.predict",
        args=(*args, "--workdir", Place(workdir, CONTAINER_WORKDIR)),
        places=(*reads, *outs, *extra),
        workdir=workdir,
        name=name,
        experiment_id=members[0].experiment_id,
        labels=labels,
        environment={"PYTHONDONTWRITEBYTECODE": "1"},
        limits=Limits(limits.memory, limits.cpus, limits.shm_size, "none", limits.threads),
        timeout_s=timeout_s,
        env_places=env_places,
    )
