"""What this node offers: GPUs (NVML), CPUs, memory, disk under the workdir, the Docker engine, the
model store and the workdir's embedding cache.

`node_info()` never raises for a missing capability: no NVML library or driver gives an empty GPU
list with a note, an unreachable Docker engine is reported as such. It is what `infra node` prints
and what every queue worker publishes as its heartbeat in Redis. Standard library only (NVML's
`pynvml` from the optional `gpu` extra and the Docker SDK are imported lazily).
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import socket
from pathlib import Path

from runner import __version__

log = logging.getLogger(__name__)


def node_info(workdir: Path | None = None, docker: dict | None = None, cache_bytes: bool = True) -> dict:
    """The node's resources as one JSON-ready document.

    `docker` reuses an earlier `docker_info()` result (the engine's version does not change between
    heartbeats, and asking it costs a round trip). `cache_bytes=False` (heartbeats) leaves out the
    embedding cache's size: containers write that folder, and walking it must not delay a heartbeat.
    """
    gpus, gpu_note = gpu_info()
    doc = {
        "hostname": socket.gethostname(),
        "infra_version": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "memory": memory_info(),
        "disk": disk_info(workdir),
        "gpus": gpus,
        "docker": docker if docker is not None else docker_info(),
        "model_store": model_store_info(),
        "embed_cache": embed_cache_info(workdir, cache_bytes),
    }
    if gpu_note:
        doc["gpu_note"] = gpu_note
    return doc


def model_store_info() -> dict:
    """The model store's path and how many models it holds ({"path": None} when none is set; a
    store that cannot be read gives its error instead of the count)."""
    from runner import modelstore
    from runner.errors import InfraError

    store = None
    try:
        store = modelstore.store_path(required=False)
        if store is None:
            return {"path": None}
        store, models = modelstore.list_models()
    except InfraError as exc:
        return {"path": str(store) if store is not None else None, "error": exc.message}
    return {"path": str(store), "models": len(models)}


def embed_cache_info(workdir: Path | None, with_bytes: bool = True) -> dict:
    """The workdir's embedding cache (`cache/embeddings`): its path and bytes ({} without a workdir)."""
    if workdir is None:
        return {}
    from runner.run.housekeeping import cache_bytes, embed_cache

    doc = {"path": str(embed_cache(workdir))}
    if with_bytes:
        doc["bytes"] = cache_bytes(workdir)
    return doc


def memory_info() -> dict:
    """Total and available memory in bytes from /proc/meminfo (None where it cannot be read)."""
    fields = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    fields[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return {"total_bytes": fields.get("MemTotal"), "available_bytes": fields.get("MemAvailable")}


def disk_info(workdir: Path | None) -> dict:
    """Free and total bytes of the filesystem holding the workdir (the experiments live there)."""
    where = Path(workdir) if workdir else Path.cwd()
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError as exc:
        return {"path": str(where), "error": exc.strerror}
    return {"path": str(where), "total_bytes": usage.total, "free_bytes": usage.free}


def gpu_info() -> tuple[list[dict], str | None]:
    """(GPUs via NVML, note): each GPU's index, name, uuid, memory, utilisation and processes.

    No `pynvml` module, no driver or no GPU gives an empty list and a note saying which.
    """
    try:
        import pynvml
    except ImportError:
        return [], "NVML not available: install the 'gpu' extra (pip install 'infra[gpu]') on GPU nodes"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded …: all mean "no usable GPU here"
        return [], f"NVML could not start ({exc}): no NVIDIA driver on this node"
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = [_one_gpu(pynvml, i, driver) for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as exc:  # the readings are complete; only the handle release failed
            log.debug("nvmlShutdown: %s", exc)
    return gpus, None if gpus else "NVML found no GPU"


def _one_gpu(pynvml, index: int, driver: str) -> dict:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
    gpu = {
        "index": index,
        "name": _text(pynvml.nvmlDeviceGetName(handle)),
        "uuid": _text(pynvml.nvmlDeviceGetUUID(handle)),
        "driver": driver,
        "memory_total_bytes": int(mem.total),
        "memory_used_bytes": int(mem.used),
        "utilization_percent": None,
        "processes": [],
    }
    try:
        gpu["utilization_percent"] = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except pynvml.NVMLError as exc:  # not supported on every board (MIG slices, some vGPUs): left None
        log.debug("GPU %d utilisation unavailable: %s", index, exc)
    try:
        gpu["processes"] = [
            {"pid": p.pid, "used_memory_bytes": p.usedGpuMemory}
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        ]
    except pynvml.NVMLError as exc:  # some drivers refuse process queries without privileges: left empty
        log.debug("GPU %d processes unavailable: %s", index, exc)
    return gpu


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def docker_info() -> dict:
    """The Docker engine's version and GPU runtime, or `reachable: false` with the reason."""
    from runner import engine
    from runner.errors import EnvironmentProblem

    try:
        client = engine.get_client(timeout=10)
    except EnvironmentProblem as exc:
        return {"reachable": False, "error": exc.message}
    try:
        return {"reachable": True, **engine.engine_info(client)}
    except Exception as exc:  # the engine went away between ping and info
        return {"reachable": False, "error": f"Docker engine stopped answering: {exc}"}
    finally:
        client.close()


def gpu_indices() -> list[str]:
    """Device indices NVML sees on this node, as strings ('0', '1', …); [] without NVML."""
    gpus, _ = gpu_info()
    return [str(g["index"]) for g in gpus]
