"""The container a training runs in, as one pure value: everything `docker run` gets (docs/security.md).

`container_spec` is the single place that decides the training's user, mounts, capabilities,
security options, limits, labels, environment and command. The run path starts exactly this
spec; `infra run --dry-run` prints it; the tests read it. No engine, no I/O beyond `stat`.

The boundary it draws:
- the training never runs as uid 0: the invoker's uid:gid, or (when infra runs as root, not via
  sudo) the node's unprivileged `train_uid:train_gid`;
- all capabilities dropped, `no-new-privileges`, not privileged, a pids limit, the plan's memory
  and CPU limits, network `none` unless the plan asks;
- mounted: the database file read-only (plus its `-wal`/`-shm` when a WAL database has them) and
  the experiment's output folders read-write, each at `/exp/<name>`. The experiment's top folder
  (status.json, events.jsonl, container.log: the host's records) and everything else on the host
  stay invisible;
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
from runner.run.logs import docker_log_config
from runner.settings import NodeSettings

CONTAINER_EXP = "/exp"
CONTAINER_DATA = "/data"
CONTAINER_WORKDIR = "/workdir"
CONTAINER_HOME = "/tmp/home"
PLAN_IN_CONTAINER = f"{CONTAINER_EXP}/config/plan.json"

LABEL_EXPERIMENT = "infra.experiment_id"
LABEL_ATTEMPT = "infra.attempt"
LABEL_PLAN = "infra.plan_sha256"
LABEL_VERSION = "infra.version"
LABEL_WORKDIR = "infra.workdir"


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
    read_only_root: bool = False  # the image's filesystem read-only (prediction), with `tmpfs` for scratch
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


def database_mounts(db: Path) -> tuple[Mount, ...]:
    """The database file read-only, plus `-wal` and `-shm` when a WAL database has both (SQLite
    needs them to read its newest pages read-only); never the folder the database sits in."""
    target = f"{CONTAINER_DATA}/{db.name}"
    mounts = [Mount(str(db), target, True)]
    side = [Path(f"{db}-wal"), Path(f"{db}-shm")]
    if all(p.is_file() and not p.is_symlink() for p in side):
        mounts += [Mount(str(p), f"{target}{p.name[len(db.name) :]}", True) for p in side]
    return tuple(mounts)


def container_db_path(db: Path) -> str:
    return f"{CONTAINER_DATA}/{Path(db).name}"


def container_spec(
    *,
    experiment_id: str,
    exp_root: Path,
    attempt: int,
    plan_sha: str,
    db: Path,
    resources: dict[str, Any],
    gpus: str | int | None,
    image: str,
    image_id: str,
    workdir: Path,
    settings: NodeSettings,
    mounted_dirs: tuple[str, ...],
    user: tuple[int, int],
) -> ContainerSpec:
    """The training container of one attempt (pure: the same inputs give the same spec)."""
    security = security_args(*user, pids_limit=settings.pids_limit)  # refuses uid 0
    exp_mounts = tuple(Mount(str(exp_root / d), f"{CONTAINER_EXP}/{d}", False) for d in mounted_dirs)
    cpus = resources.get("cpus")
    return ContainerSpec(
        image=image,
        command=("infra-train", PLAN_IN_CONTAINER, "--exp-dir", CONTAINER_EXP, "--workdir", CONTAINER_WORKDIR),
        name=f"infra-{experiment_id}-{workdir_identity(workdir)[:8]}",
        user=security["user"],
        labels={
            LABEL_EXPERIMENT: experiment_id,
            LABEL_ATTEMPT: str(attempt),
            LABEL_PLAN: plan_sha,
            LABEL_VERSION: __version__,
            LABEL_WORKDIR: workdir_identity(workdir),
        },
        mounts=(*database_mounts(db), *exp_mounts),
        environment={
            "HOME": CONTAINER_HOME,
            "INFRA_IMAGE_ID": image_id,
            "INFRA_EXPERIMENT_ID": experiment_id,
            "PYTHONUNBUFFERED": "1",
            "MPLBACKEND": "Agg",
        },
        cap_drop=tuple(security["cap_drop"]),
        security_opt=tuple(security["security_opt"]),
        pids_limit=security["pids_limit"],
        mem_limit=resources.get("memory"),
        nano_cpus=int(cpus * 1e9) if cpus else None,
        shm_size=resources.get("shm_size"),
        network_mode=resources.get("network") or "none",
        gpus=gpus if gpus not in (None, 0, "none", "0") else None,
        log_config=docker_log_config(settings.log_limit_bytes),
    )


PREDICT_IN = "/in"
PREDICT_OUT = "/out"
LABEL_PURPOSE = "infra.purpose"


def predict_spec(
    *,
    experiment_id: str,
    name: str,
    image: str,
    image_id: str,
    workdir: Path,
    settings: NodeSettings,
    user: tuple[int, int],
    read_only_files: tuple[tuple[Path, str], ...],
    out_dir: Path,
    command: tuple[str, ...],
) -> ContainerSpec:
    """The container of `infra predict` (pure): the training's hardening and labels, network none, a
    read-only root with a private /tmp, and only what prediction reads — the checkpoint and config
    files, the input — read-only (host path, container path), plus one fresh output folder at /out."""
    security = security_args(*user, pids_limit=settings.pids_limit)  # refuses uid 0
    files = tuple(Mount(str(host), target, True) for host, target in read_only_files)
    return ContainerSpec(
        image=image,
        command=command,
        name=name,
        user=security["user"],
        labels={
            LABEL_EXPERIMENT: experiment_id,
            LABEL_PURPOSE: "predict",
            LABEL_VERSION: __version__,
            LABEL_WORKDIR: workdir_identity(workdir),
        },
        mounts=(*files, Mount(str(out_dir), PREDICT_OUT, False)),
        environment={
            "HOME": CONTAINER_HOME,
            "INFRA_IMAGE_ID": image_id,
            "INFRA_EXPERIMENT_ID": experiment_id,
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "MPLBACKEND": "Agg",
        },
        cap_drop=tuple(security["cap_drop"]),
        security_opt=tuple(security["security_opt"]),
        pids_limit=security["pids_limit"],
        network_mode="none",
        log_config=docker_log_config(settings.log_limit_bytes),
        read_only_root=True,
        tmpfs=(("/tmp", "rw,nosuid,nodev,size=1g,mode=1777"),),
    )
