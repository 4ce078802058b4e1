"""The container of a core job, as one pure value: everything `docker run` gets (docs/security.md).

`container_spec(job, …)` is the single place that decides a container's user, mounts, capabilities,
security options, limits, labels, environment and command, for every job of the training core
(`runner.run.jobs.CoreJob`: a training, a prediction, plugin discovery, a study slot). The docker
backend starts exactly this spec; `infra run --dry-run` prints it; the tests read it. No engine,
no I/O.

The boundary it draws:
- the core never runs as uid 0: the invoker's uid:gid, or (when infra runs as root, not via
  sudo) the node's unprivileged `train_uid:train_gid`;
- all capabilities dropped, `no-new-privileges`, not privileged, a pids limit, the plan's memory
  and CPU limits, network `none` unless the plan asks;
- mounted: exactly the job's places — for a training the database file read-only (plus its
  `-wal`/`-shm` when a WAL database has them) and the experiment's output folders read-write, each
  at `/exp/<name>`. The experiment's top folder (status.json, events.jsonl, container.log: the
  host's records) and everything else on the host stay invisible;
- labels name the experiment, its attempt, plan hash, infra version and the workdir's identity, so
  each workdir only ever touches its own containers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner import __version__
from runner.run.hardening import CAP_DROP, PIDS_LIMIT, SECURITY_OPT, security_args
from runner.run.jobs import CONTAINER_DATA, CoreJob, core_environment
from runner.run.logs import docker_log_config
from runner.settings import NodeSettings

CONTAINER_HOME = "/tmp/home"

LABEL_EXPERIMENT = "infra.experiment_id"
LABEL_ATTEMPT = "infra.attempt"
LABEL_PLAN = "infra.plan_sha256"
LABEL_VERSION = "infra.version"
LABEL_WORKDIR = "infra.workdir"
LABEL_PURPOSE = "infra.purpose"  # what a short-lived container is for: predict, plugin-discovery
LABEL_STUDY = "infra.study"
LABEL_SLOT = "infra.slot"
# Every core container has a read-only image filesystem and this private, capped /tmp (a tmpfs, so
# it counts against the container's memory): scratch a plugin writes cannot fill the node's disk
# behind `min_free_bytes`, nor outlive the container. Outputs go to the mounted experiment folders.
PRIVATE_TMP = "1g"


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool

    def describe(self) -> str:
        return f"{self.source}:{self.target}:{'ro' if self.read_only else 'rw'}"


@dataclass(frozen=True)
class ContainerSpec:
    """Everything the engine is asked for; `engine_kwargs()` is what `engine.run_container` takes."""

    image: str
    command: tuple[str, ...]
    name: str
    user: str
    labels: dict[str, str]
    mounts: tuple[Mount, ...]
    environment: dict[str, str]
    cap_drop: tuple[str, ...] = CAP_DROP
    security_opt: tuple[str, ...] = SECURITY_OPT
    pids_limit: int = PIDS_LIMIT
    mem_limit: str | None = None
    nano_cpus: int | None = None
    shm_size: str | None = None
    network_mode: str = "none"
    gpus: str | int | None = None
    log_config: dict[str, Any] = field(default_factory=dict)
    read_only_root: bool = False  # the image's filesystem read-only, with `tmpfs` for scratch (container_spec: always)
    tmpfs: tuple[tuple[str, str], ...] = ()

    def engine_kwargs(self) -> dict[str, Any]:
        extra = {"read_only": True, "tmpfs": dict(self.tmpfs)} if self.read_only_root else {}
        return {
            **extra,
            "command": list(self.command),
            "name": self.name,
            "labels": dict(self.labels),
            "mounts": [(m.source, m.target, "ro" if m.read_only else "rw") for m in self.mounts],
            "user": self.user,
            "environment": dict(self.environment),
            "shm_size": self.shm_size,
            "mem_limit": self.mem_limit,
            "nano_cpus": self.nano_cpus,
            "network_mode": self.network_mode,
            "gpus": self.gpus,
            "cap_drop": list(self.cap_drop),
            "security_opt": list(self.security_opt),
            "pids_limit": self.pids_limit,
            "log_config": dict(self.log_config) or None,
        }

    def describe(self) -> dict[str, Any]:
        """A JSON-able view for `--dry-run` and audits."""
        return {
            "image": self.image,
            "name": self.name,
            "command": list(self.command),
            "user": self.user,
            "mounts": [m.describe() for m in self.mounts],
            "cap_drop": list(self.cap_drop),
            "security_opt": list(self.security_opt),
            "privileged": False,
            "pids_limit": self.pids_limit,
            "memory": self.mem_limit,
            "cpus": self.nano_cpus / 1e9 if self.nano_cpus else None,
            "shm_size": self.shm_size,
            "network": self.network_mode,
            "gpus": self.gpus,
            "labels": dict(self.labels),
            "environment": dict(self.environment),
            "log_config": dict(self.log_config),
        }


def workdir_identity(workdir: Path) -> str:
    """A short, stable name for a workdir (its real path hashed): containers are matched by it."""
    return hashlib.sha256(str(Path(workdir).resolve()).encode()).hexdigest()[:16]


def container_db_path(db: Path) -> str:
    return f"{CONTAINER_DATA}/{Path(db).name}"


def container_spec(job: CoreJob, *, user: tuple[int, int], settings: NodeSettings) -> ContainerSpec:
    """The container of one core job (pure: the same job gives the same spec).

    Mounted: exactly the job's `places`, each read-only unless the job writes it. Labels: the
    job's own, plus the infra version, the workdir's identity and the experiment id (when the job
    belongs to one). The image's filesystem is read-only and /tmp a private tmpfs of `PRIVATE_TMP`
    for every job (training, study slot, prediction, discovery).
    """
    security = security_args(*user, pids_limit=settings.pids_limit)  # refuses uid 0
    labels = {**job.labels, LABEL_VERSION: __version__, LABEL_WORKDIR: workdir_identity(job.workdir)}
    if job.experiment_id:
        labels[LABEL_EXPERIMENT] = job.experiment_id
    environment = {"HOME": CONTAINER_HOME, **core_environment(job)}
    if job.image_id:
        environment["INFRA_IMAGE_ID"] = job.image_id
    log_limit = job.log_limit or settings.log_limit_bytes
    limits = job.limits
    return ContainerSpec(
        image=job.image_id or job.image or "<the plugin image>",
        command=tuple(job.argv(inside=True)),
        name=job.name,
        user=security["user"],
        labels=labels,
        mounts=tuple(Mount(str(p.host), p.inside, p.read_only) for p in job.places),
        environment=environment,
        cap_drop=tuple(security["cap_drop"]),
        security_opt=tuple(security["security_opt"]),
        pids_limit=security["pids_limit"],
        mem_limit=limits.memory,
        nano_cpus=int(limits.cpus * 1e9) if limits.cpus else None,
        shm_size=limits.shm_size,
        network_mode=limits.network or "none",
        gpus=job.gpus.engine_value(),
        log_config=docker_log_config(log_limit),
        read_only_root=True,
        tmpfs=(("/tmp", f"rw,nosuid,nodev,size={PRIVATE_TMP},mode=1777"),),
    )
