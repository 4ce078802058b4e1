"""The hardening every container infra starts runs with: trainings and plugin discovery alike.

Both run the workdir's plugin code, so both get the same settings (DESIGN §7): never uid 0 (the
invoking user, or an unprivileged uid when the invoker is root), every capability dropped,
no-new-privileges, a pids limit. Pure: `security_args()` returns keyword arguments for
`runner.engine.container_args` / `run_container`; the network (`network_mode="none"` there by
default) and mounts stay with the caller.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from runner.errors import UsageError

PIDS_LIMIT = 4096
CAP_DROP = ("ALL",)
SECURITY_OPT = ("no-new-privileges",)


def unprivileged_user(env: Mapping[str, str] | None = None, euid: int | None = None, settings=None) -> tuple[int, int]:
    """uid, gid a container runs as: the invoker's; under sudo the sudo caller's; for root itself the
    node's `train_uid:train_gid` (INFRA_TRAIN_UID / INFRA_TRAIN_GID or the config file; default
    10001:10001). Never 0: the settings refuse it."""
    from runner.settings import node_settings

    env = os.environ if env is None else env
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        return os.getuid(), os.getgid()
    sudo_uid = env.get("SUDO_UID", "")
    if sudo_uid.isdigit() and int(sudo_uid) != 0:
        gid = env.get("SUDO_GID", sudo_uid)
        return int(sudo_uid), int(gid) if gid.isdigit() and int(gid) != 0 else int(sudo_uid)
    settings = settings or node_settings(env=env)
    return settings.train_uid, settings.train_gid


def security_args(uid: int, gid: int, *, pids_limit: int = PIDS_LIMIT) -> dict:
    """`user`, `cap_drop`, `security_opt` and `pids_limit` for `engine.container_args`; uid 0 is refused."""
    if uid == 0:
        raise UsageError(f"containers never run as uid 0 (asked for {uid}:{gid}); see unprivileged_user()")
    return {
        "user": f"{uid}:{gid}",
        "cap_drop": list(CAP_DROP),
        "security_opt": list(SECURITY_OPT),
        "pids_limit": pids_limit,
    }
