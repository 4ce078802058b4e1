"""The one adapter that talks to the Docker engine: client, images, builds, containers, logs, GPUs.

Everything else in infra goes through these functions and never imports `docker` itself. The client
is made lazily by `get_client()` and passed in explicitly; importing this module contacts nothing.
Engine failures come out as infra errors: `EnvironmentProblem` (exit 3) with what to install or
start, `BuildError` (exit 3) with the failing build step and the tail of the build log.

Pure helpers (`device_requests`, `container_args`) build the arguments without an engine, so they
are unit-tested and printable with `--dry-run`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any

from runner.errors import BuildError, EnvironmentProblem

log = logging.getLogger(__name__)

LogCallback = Callable[[str], None]

START_DOCKER_HINT = (
    "start it (as root: 'bash scripts/start-services.sh docker', or 'systemctl start docker') or install it "
    "('apt-get install -y docker.io'); set DOCKER_HOST to use another engine"
)
NVIDIA_HINT = (
    "install the NVIDIA Container Toolkit "
    "(https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/install-guide.html), run "
    "'nvidia-ctk runtime configure --runtime=docker' and restart Docker, or run with --gpus none"
)
BUILD_LOG_TAIL_LINES = 40
_STEP_RE = re.compile(r"^Step \d+/\d+ : ")
_LAYER_RE = re.compile(r"^ ---> ([0-9a-f]{12,64})$")  # the classic builder's "this step's image is …"


def get_client(base_url: str | None = None, timeout: int = 120):
    """Return a `docker.DockerClient` connected to a live engine (DOCKER_HOST or the local socket).

    Raises EnvironmentProblem (exit 3) saying how to start or install Docker when the engine does not
    answer a ping. `timeout` is the per-request timeout in seconds (builds stream, so it is per chunk).
    """
    import docker
    from docker.errors import DockerException

    try:
        if base_url:
            client = docker.DockerClient(base_url=base_url, timeout=timeout)
        else:
            client = docker.from_env(timeout=timeout)
        client.ping()
    except DockerException as exc:
        where = base_url or "DOCKER_HOST / unix:///var/run/docker.sock"
        raise EnvironmentProblem(
            f"Docker engine not reachable at {where} ({_short(exc)}): {START_DOCKER_HINT}"
        ) from None
    except Exception as exc:  # requests' connection errors, a socket refusing: all mean "no engine"
        raise EnvironmentProblem(f"Docker engine not reachable ({_short(exc)}): {START_DOCKER_HINT}") from None
    return client


def engine_info(client) -> dict:
    """A small summary of the engine for `infra node` and `config/environment.json`."""
    info = client.info()
    version = client.version()
    runtimes = sorted((info.get("Runtimes") or {}).keys())
    return {
        "server_version": version.get("Version"),
        "api_version": version.get("ApiVersion"),
        "os": info.get("OperatingSystem"),
        "kernel": info.get("KernelVersion"),
        "cpus": info.get("NCPU"),
        "memory_bytes": info.get("MemTotal"),
        "root_dir": info.get("DockerRootDir"),
        "runtimes": runtimes,
        "default_runtime": info.get("DefaultRuntime"),
        "gpu_runtime": "nvidia" in runtimes,
    }


def gpu_runtime_available(client) -> bool:
    """True when the engine has the NVIDIA runtime (`docker info` Runtimes lists `nvidia`)."""
    return "nvidia" in (client.info().get("Runtimes") or {})


# --- images ---------------------------------------------------------------------------------------


def get_image_id(client, tag: str) -> str | None:
    """The image id (`sha256:…`) for a tag or id, or None when the engine does not have it."""
    from docker.errors import ImageNotFound

    try:
        return client.api.inspect_image(tag)["Id"]
    except ImageNotFound:
        return None


def image_exists(client, tag: str) -> bool:
    """True when the engine has an image with this tag or id (one inspect call, no listing)."""
    return get_image_id(client, tag) is not None


def image_labels(client, tag: str) -> dict:
    """The labels of an image, {} when it has none; raises EnvironmentProblem when it is missing."""
    from docker.errors import ImageNotFound

    try:
        return client.api.inspect_image(tag)["Config"].get("Labels") or {}
    except ImageNotFound:
        raise EnvironmentProblem(f"image {tag} not found in the Docker engine: build it with 'infra build'") from None


def remove_image(client, tag: str, force: bool = False) -> bool:
    """Remove an image by tag or id; False when it was not there."""
    from docker.errors import ImageNotFound

    try:
        client.api.remove_image(tag, force=force)
    except ImageNotFound:
        return False
    return True


def find_images(client, labels: Mapping[str, str]) -> list:
    """Images carrying all these labels (e.g. {"infra.kind": "plugins"})."""
    return client.images.list(filters={"label": [f"{k}={v}" for k, v in labels.items()]})


def labelled_images(client, label: str) -> list[dict]:
    """Every image (dangling ones too) carrying the label `label`, as
    {"id", "tags", "labels", "created" (unix seconds), "size" (bytes)}: one list call, no inspect."""
    rows = client.api.images(all=False, filters={"label": label})
    return [
        {
            "id": r["Id"],
            "tags": [t for t in (r.get("RepoTags") or []) if t != "<none>:<none>"],
            "labels": r.get("Labels") or {},
            "created": int(r.get("Created") or 0),
            "size": int(r.get("Size") or 0),
        }
        for r in rows
    ]


def container_image_ids(client) -> set[str]:
    """The image ids of every container the engine has, running or stopped (one list call)."""
    return {c["ImageID"] for c in client.api.containers(all=True) if c.get("ImageID")}


def delete_image(client, image: dict) -> bool:
    """Remove an image (a `labelled_images` row) never forced: by each tag, the last removal deleting
    it, or by id when it has none. An image a container uses or with child images stays (False, the
    engine's reason logged); True when it is gone."""
    from docker.errors import APIError, ImageNotFound

    try:
        for ref in image["tags"] or [image["id"]]:
            client.api.remove_image(ref, force=False, noprune=False)
    except ImageNotFound:
        return True
    except APIError as exc:
        if exc.status_code == 409:  # in use by a container, or has dependent child images
            log.warning("image %s kept: %s", image["id"][:19], _short(exc))
            return False
        raise EnvironmentProblem(f"could not remove image {image['id'][:19]}: {_short(exc)}") from None
    return get_image_id(client, image["id"]) is None


def build_image(
    client,
    context: bytes | IO[bytes],
    tag: str,
    *,
    buildargs: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    dockerfile: str = "Dockerfile",
    on_log: LogCallback | None = None,
    nocache: bool = False,
) -> str:
    """Build an image from a tar build context (bytes or a binary file object) and tag it.

    Uses the engine's classic builder (what the SDK speaks), so Dockerfiles must not use
    `RUN --mount`. Each build-log line goes to `on_log` as it arrives (and to the debug log).
    Returns the new image id. On failure raises BuildError whose `step` is the Dockerfile
    instruction that failed and `log_tail` the last lines of the build log, after removing the
    untagged step images this build created (a failed build leaves none behind; images it took from
    the cache, or that another build has built on meanwhile, are kept).
    """
    from docker.errors import APIError

    fileobj = io.BytesIO(context) if isinstance(context, bytes | bytearray) else context
    tail: deque[str] = deque(maxlen=BUILD_LOG_TAIL_LINES)
    step = ""
    image_id = None
    error = None
    partial = ""
    created: list[str] = []  # step images this build made, oldest first
    cached = False

    def emit(line: str) -> None:
        nonlocal step, cached
        if _STEP_RE.match(line):
            step, cached = line, False
        elif line == " ---> Using cache":
            cached = True
        else:
            layer = _LAYER_RE.match(line)
            # FROM names an existing image; a cached step reuses one: neither was made here
            if layer and not cached and not _is_from(step):
                created.append(layer.group(1))
        tail.append(line)
        log.debug("build %s: %s", tag, line)
        if on_log is not None:
            on_log(line)

    try:
        stream = client.api.build(
            fileobj=fileobj,
            custom_context=True,
            tag=tag,
            buildargs=dict(buildargs or {}),
            labels=dict(labels or {}),
            dockerfile=dockerfile,
            rm=True,
            forcerm=True,
            nocache=nocache,
            decode=True,
        )
        for chunk in stream:
            if "stream" in chunk:
                text = partial + chunk["stream"]
                *lines, partial = text.split("\n")
                for line in lines:
                    if line.strip():
                        emit(line.rstrip())
            if "aux" in chunk and isinstance(chunk["aux"], dict) and "ID" in chunk["aux"]:
                image_id = chunk["aux"]["ID"]
            if "error" in chunk or "errorDetail" in chunk:
                error = (chunk.get("errorDetail") or {}).get("message") or chunk.get("error") or "build failed"
        if partial.strip():
            emit(partial.rstrip())
    except APIError as exc:
        error = _short(exc)
    except BaseException:  # interrupted: what this build made is as useless as after a failure
        _remove_untagged(client, created)
        raise
    if error is not None:
        _remove_untagged(client, created)
        if not tail or tail[-1] != error:
            tail.append(error)
        short_step = step if len(step) <= 100 else step[:97] + "..."
        where = f" at '{short_step}'" if step else ""
        # the engine's error repeats the whole RUN command; its exit code is the useful part
        reason = error.strip().splitlines()[-1] if error.strip() else error
        code = re.search(r"returned a non-zero code: (\d+)", reason)
        reason = f"the step exited with code {code.group(1)} (log tail below)" if code else reason[:300]
        raise BuildError(
            f"building image {tag} failed{where}: {reason}",
            step=step,
            log_tail="\n".join(tail),
        )
    return image_id or get_image_id(client, tag) or ""


def _is_from(step: str) -> bool:
    return bool(re.match(r"^Step \d+/\d+ : FROM\s", step, re.I))


def _remove_untagged(client, image_ids: Sequence[str]) -> None:
    """Remove these images, newest first, when they still have no tag; never their parents
    (noprune: those may be another build's cache) and never by force (one in use stays)."""
    from docker.errors import APIError

    for image_id in reversed(image_ids):
        try:
            if client.api.inspect_image(image_id).get("RepoTags"):
                continue
            client.api.remove_image(image_id, force=False, noprune=True)
        except APIError as exc:  # gone already, or now a parent/used: keep it
            log.debug("keeping image %s after a failed build: %s", image_id, _short(exc))


# --- containers -----------------------------------------------------------------------------------


def device_requests(gpus: None | str | int) -> list | None:
    """Docker device requests for a GPU spec: None/"none"/0 → no GPUs, "all" or -1 → every GPU,
    an int n → n GPUs, "0,2" → those device ids. Raises ValueError for anything else."""
    from docker.types import DeviceRequest

    if gpus is None or gpus == 0 or (isinstance(gpus, str) and gpus.strip().lower() in ("", "none", "0")):
        return None
    caps = [["gpu"]]
    if isinstance(gpus, bool):
        raise ValueError(f"invalid GPU spec {gpus!r}: use 'all', a count, a device list like '0,2', or 'none'")
    if isinstance(gpus, int):
        if gpus < -1:
            raise ValueError(f"invalid GPU count {gpus}: use 'all', a count >= 1, a device list like '0,2', or 'none'")
        return [DeviceRequest(count=gpus, capabilities=caps)]
    spec = str(gpus).strip().lower()
    if spec == "all":
        return [DeviceRequest(count=-1, capabilities=caps)]
    ids = [part.strip() for part in spec.split(",")]
    if all(part.isdigit() for part in ids):
        return [DeviceRequest(device_ids=ids, capabilities=caps)]
    raise ValueError(f"invalid GPU spec {gpus!r}: use 'all', a count, a device list like '0,2', or 'none'")


def container_args(
    image: str,
    command: Sequence[str] | str | None,
    *,
    name: str | None = None,
    labels: Mapping[str, str] | None = None,
    mounts: Sequence[tuple[str, str, str]] = (),
    user: str | None = None,
    environment: Mapping[str, str] | None = None,
    shm_size: str | int | None = None,
    mem_limit: str | int | None = None,
    nano_cpus: int | None = None,
    network_mode: str | None = "none",
    gpus: None | str | int = None,
    working_dir: str | None = None,
    init: bool = True,
    cap_drop: Sequence[str] | None = None,
    security_opt: Sequence[str] | None = None,
    pids_limit: int | None = None,
    log_config: Mapping[str, Any] | None = None,
    read_only: bool | None = None,
    tmpfs: Mapping[str, str] | None = None,
) -> dict:
    """The keyword arguments for `client.containers.create` (pure; no engine needed).

    `mounts` are (host path, container path, mode) with mode "ro" or "rw". `init` runs docker-init
    as PID 1 so SIGTERM from `docker stop` reaches the training process. `cap_drop`,
    `security_opt`, `pids_limit`, `log_config` ({"type": …, "config": {…}}), `read_only` and
    `tmpfs` ({path: options}) pass through to the engine; `runner.run.hardening.security_args()`
    gives the hardening every container of infra runs with.
    """
    volumes = {}
    for host, target, mode in mounts:
        if mode not in ("ro", "rw"):
            raise ValueError(f"mount {host}:{target}: mode must be 'ro' or 'rw', not {mode!r}")
        volumes[str(host)] = {"bind": str(target), "mode": mode}
    args: dict[str, Any] = {
        "image": image,
        "command": list(command) if isinstance(command, list | tuple) else command,
        "labels": dict(labels or {}),
        "environment": dict(environment or {}),
        "volumes": volumes,
        "detach": True,
        "init": init,
        "privileged": False,
    }
    optional = {
        "name": name,
        "user": user,
        "shm_size": shm_size,
        "mem_limit": mem_limit,
        "nano_cpus": nano_cpus,
        "network_mode": network_mode,
        "working_dir": working_dir,
        "device_requests": device_requests(gpus),
        "cap_drop": list(cap_drop) if cap_drop is not None else None,
        "security_opt": list(security_opt) if security_opt is not None else None,
        "pids_limit": pids_limit,
        "log_config": dict(log_config) if log_config is not None else None,
        "read_only": read_only,
        "tmpfs": dict(tmpfs) if tmpfs is not None else None,
    }
    args.update({k: v for k, v in optional.items() if v is not None})
    return args


def run_container(client, image: str, command: Sequence[str] | str | None, **kwargs):
    """Create and start a container (keyword arguments as `container_args`) and return it.

    If the start fails the container is removed again, so nothing is left behind. A GPU request on an
    engine without the NVIDIA runtime raises EnvironmentProblem saying to install the NVIDIA
    Container Toolkit; a missing image raises EnvironmentProblem saying to build it.
    """
    from docker.errors import APIError, ImageNotFound

    args = container_args(image, command, **kwargs)
    try:
        container = client.containers.create(**args)
    except ImageNotFound:
        raise EnvironmentProblem(f"image {image} not found in the Docker engine: build it with 'infra build'") from None
    except APIError as exc:
        raise _container_error(exc, image, kwargs.get("gpus")) from None
    try:
        container.start()
    except BaseException as exc:
        with contextlib.suppress(Exception):
            container.remove(force=True)
        if isinstance(exc, APIError):
            raise _container_error(exc, image, kwargs.get("gpus")) from None
        raise
    return container


@contextlib.contextmanager
def started_container(
    client, image: str, command: Sequence[str] | str | None, *, remove: bool = True, stop_timeout: int = 30, **kwargs
) -> Iterator:
    """Context manager around `run_container`: yields the started container and, on leaving, stops it
    (giving it `stop_timeout` seconds to checkpoint) and removes it when `remove` is true."""
    container = run_container(client, image, command, **kwargs)
    try:
        yield container
    finally:
        stop(container, timeout=stop_timeout)
        if remove:
            remove_container(container)


LOG_READ_SIZE = 1 << 20  # the most bytes one read of a log stream returns


def log_chunks(
    container,
    *,
    follow: bool = False,
    tail: int | None = None,
    since: int | None = None,
    stdout: bool = True,
    stderr: bool = True,
) -> Iterator[bytes]:
    """The container's output as raw byte chunks (both streams interleaved by default), in bounded memory.

    `follow` keeps streaming until the container exits; `tail` starts at the last `tail` log lines
    (in one request with `follow`, so nothing is repeated or missed); nothing when the container is
    gone. The engine's framed stream is read in blocks of up to LOG_READ_SIZE bytes and unframed
    here: docker-py's own iterator makes two reads per log line (four times slower on 100-byte lines).

    The engine ends a follow when the container exits even if the follower has not read everything
    yet (moby's json-file reader; `docker logs -f` loses the end the same way), and re-sends old
    messages after a log rotation. So a follow asks for timestamps, drops what is sent twice
    (`_InOrder`), and when it ends, reads the rest with a plain request from the newest timestamp.
    """
    from docker.errors import NotFound

    api = container.client.api
    try:
        tty = bool(api.inspect_container(container.id)["Config"].get("Tty"))
    except NotFound:
        return
    params: dict[str, Any] = {
        "stdout": int(stdout),
        "stderr": int(stderr),
        "follow": int(follow),
        "timestamps": 0,
        "tail": "all" if tail is None else int(tail),
    }
    if since is not None:
        params["since"] = since
    if tty or not follow:  # a TTY's raw stream has no message boundaries to put timestamps on
        yield from _log_request(container, params, tty)
        return
    order = _InOrder()
    for batch in _log_request(container, {**params, "timestamps": 1}, tty, frames=True):
        yield b"".join(filter(None, map(order.keep, batch)))
    with contextlib.suppress(Exception):  # it ended because the container stopped: let it finish
        api.wait(container.id)
    rest = {**params, "follow": 0, "timestamps": 1}
    if order.last_stamp is not None:
        rest.update(tail="all", since=order.since())
        order.replay()  # what the engine sends from `since` on begins with what this follow had
    for batch in _log_request(container, rest, tty, frames=True):
        yield b"".join(filter(None, map(order.keep, batch)))


class _InOrder:
    """Strips the engine's timestamps and drops what it sends twice.

    Docker 20.10's json-file follow re-sends a whole rotated file after a rotation (measured: about
    96,000 lines again, three times in a 300 MB flood), and the catch-up read from `since` repeats
    the messages stamped exactly `since`. A message stamped more than TOLERANCE_NS before the newest
    one starts a replay: messages up to the newest one (and as many stamped equal to it as were kept)
    are dropped until a newer one arrives. Within the tolerance an older stamp is kept: stdout and
    stderr are stamped by separate copiers, so their order in the file can be inverted by a little.
    """

    TOLERANCE_NS = 10_000_000

    def __init__(self):
        self.last = -1  # the newest stamp kept, ns since the epoch
        self.last_stamp: bytes | None = None
        self.count = 0  # messages kept with that stamp (the parts of one long line share it)
        self._equal_to_drop: int | None = None  # in a replay: how many stamped `last` are repeats
        self._seconds: dict[bytes, int] = {}

    def _ns(self, stamp: bytes) -> int:
        whole, _, frac = stamp.rstrip(b"Z").partition(b".")
        seconds = self._seconds.get(whole)
        if seconds is None:
            from datetime import UTC, datetime

            if len(self._seconds) > 1024:
                self._seconds.clear()
            seconds = self._seconds[whole] = int(datetime.fromisoformat(whole.decode()).replace(tzinfo=UTC).timestamp())
        return seconds * 1_000_000_000 + int(frac[:9].ljust(9, b"0") or b"0")

    def replay(self) -> None:
        self._equal_to_drop = self.count

    def keep(self, payload: bytes) -> bytes | None:
        stamp, _, text = payload.partition(b" ")
        try:
            t = self._ns(stamp)
        except ValueError:  # not a stamp: keep the message as it is
            return payload
        if self._equal_to_drop is not None:
            if t < self.last:
                return None
            if t == self.last and self._equal_to_drop > 0:
                self._equal_to_drop -= 1
                return None
            self._equal_to_drop = None
        elif t < self.last - self.TOLERANCE_NS:
            self.replay()
            return None
        if t > self.last:
            self.last, self.last_stamp, self.count = t, stamp, 1
        elif t == self.last:
            self.count += 1
        return text

    def since(self) -> str:
        """The newest stamp as the `since` the engine takes: UNIX seconds with nanoseconds."""
        return f"{self.last // 1_000_000_000}.{self.last % 1_000_000_000:09d}"


def _log_request(container, params: dict, tty: bool, frames: bool = False) -> Iterator[bytes]:
    """One logs request: raw blocks (TTY), or the payloads of the multiplexed stream joined per
    block (`frames`: a list of the block's payloads)."""
    from docker.errors import APIError, NotFound

    api = container.client.api
    try:
        response = api._get(api._url("/containers/{0}/logs", container.id), params=params, stream=True)
        api._raise_for_status(response)
    except NotFound:
        return
    except APIError as exc:
        # 409 "can not get logs from container which is dead or marked for removal": its runner removed
        # it while another (an attached `infra run`, a slot reader) was reading its end: gone, as above
        if exc.status_code == 409:
            return
        raise
    try:
        read1 = getattr(response.raw, "read1", None)  # urllib3 >= 2: what has arrived, up to the size
        if read1 is None:  # older urllib3 would block until a whole block arrived: let docker-py frame it
            kwargs = {k: v for k, v in params.items() if k != "timestamps"}
            stream = container.logs(stream=True, timestamps=bool(params.get("timestamps")), **kwargs)
            yield from ([payload] for payload in stream) if frames else stream
            return
        api._disable_socket_timeout(api._get_raw_response_socket(response))
        blocks = iter(lambda: read1(LOG_READ_SIZE), b"")
        yield from blocks if tty else _unframe(blocks, frames)
    finally:
        response.close()


def _unframe(blocks: Iterator[bytes], frames: bool = False) -> Iterator[bytes]:
    """Payloads of the engine's multiplexed stream (8-byte headers: stream, 3 zero bytes, big-endian
    size), joined per block, or as the list of the block's payloads (`frames`). A frame is at most one engine message (16 KiB) plus
    its header, so the carried-over bytes stay small."""
    buf = b""
    for block in blocks:
        buf = buf + block if buf else block
        pos, out = 0, []
        while len(buf) - pos >= 8:
            size = int.from_bytes(buf[pos + 4 : pos + 8], "big")
            if pos + 8 + size > len(buf):
                break
            out.append(buf[pos + 8 : pos + 8 + size])
            pos += 8 + size
        buf = buf[pos:]
        if out:
            yield out if frames else b"".join(out)


def stream_logs(
    container, on_line: LogCallback, *, follow: bool = True, since: int | None = None, tail: int | None = None
) -> None:
    """Call `on_line` with each line of the container's stdout+stderr (decoded, no newline) until the
    container exits (follow) or the current end of its log.

    Lines are capped at `runner.lines.LINE_LIMIT` bytes (a longer one ends with a truncation marker)
    and split in linear time, so one endless line costs no more than many short ones. The text is
    not made terminal-safe: callers that print it use `runner.lines.terminal_safe`.
    """
    from runner.lines import LineSplitter

    splitter = LineSplitter(lambda line: on_line(line.decode("utf-8", errors="replace").rstrip("\r")))
    for chunk in log_chunks(container, follow=follow, since=since, tail=tail):
        splitter.feed(chunk)
    splitter.close()


OUTPUT_LIMIT = 16 << 20  # bytes of a container's output `container_output` returns


def container_output(
    container, *, stdout: bool = True, stderr: bool = True, tail: int | None = None, limit: int = OUTPUT_LIMIT
) -> str:
    """The container's recorded output as text (both streams interleaved by default; '' when gone).

    At most the first `limit` bytes (of the last `tail` lines when given): the rest is not read.
    """
    kept, size = [], 0
    for chunk in log_chunks(container, stdout=stdout, stderr=stderr, tail=tail):
        kept.append(chunk[: limit - size])
        size += len(kept[-1])
        if size >= limit:
            break
    return b"".join(kept).decode("utf-8", errors="replace")


def log_tail(container, lines: int = 50) -> str:
    """The last `lines` lines of the container's log, each capped like `stream_logs` ('' when gone)."""
    out: deque[str] = deque(maxlen=max(lines, 0))
    stream_logs(container, out.append, follow=False, tail=lines)
    return "\n".join(out)


def wait(container, timeout: float | None = None) -> int:
    """Block until the container exits and return its exit code."""
    result = container.wait(timeout=timeout) if timeout is not None else container.wait()
    return int(result.get("StatusCode", -1))


def stop(container, timeout: int = 30) -> None:
    """Stop gracefully: SIGTERM, then SIGKILL after `timeout` seconds. A gone container is fine."""
    from docker.errors import APIError, NotFound

    try:
        container.stop(timeout=timeout)
    except NotFound:
        pass
    except APIError as exc:
        log.warning("stopping container %s: %s", getattr(container, "short_id", "?"), _short(exc))


def remove_container(container, force: bool = True) -> None:
    """Remove a container; one already gone, or being removed by another runner (409), is fine."""
    from docker.errors import APIError, NotFound

    try:
        container.remove(force=force)
    except NotFound:
        pass
    except APIError as exc:
        if exc.status_code == 409 and "already in progress" in str(exc):
            return
        raise EnvironmentProblem(f"could not remove container {container.short_id}: {_short(exc)}") from None


def get_container(client, container_id: str):
    """The container with this id or name, or None."""
    from docker.errors import NotFound

    try:
        return client.containers.get(container_id)
    except NotFound:
        return None


def find_containers(client, labels: Mapping[str, str], all: bool = True) -> list:  # noqa: A002 - docker's name
    """Containers carrying all these labels (e.g. {"infra.experiment_id": "x"}); stopped ones too
    unless `all` is false.

    Sparse: no inspect per container, so a container that another process removes between the list
    and an inspect cannot make the listing itself fail (`container_state` then says it is gone).
    """
    return client.containers.list(all=all, sparse=True, filters={"label": [f"{k}={v}" for k, v in labels.items()]})


def container_state(container) -> dict:
    """The engine's state of a container: {"status", "exit_code", "oom_killed", "started_at", "finished_at"}.

    A container removed meanwhile has status "removed" (and no exit code).
    """
    from docker.errors import NotFound

    try:
        container.reload()
    except NotFound:
        return {"status": "removed", "exit_code": None, "oom_killed": None, "started_at": None, "finished_at": None}
    state = container.attrs.get("State", {})
    return {
        "status": state.get("Status"),
        "exit_code": state.get("ExitCode"),
        "oom_killed": state.get("OOMKilled"),
        "started_at": state.get("StartedAt"),
        "finished_at": state.get("FinishedAt"),
    }


def _container_error(exc, image: str, gpus) -> EnvironmentProblem:
    text = _short(exc)
    if "could not select device driver" in text or ("nvidia" in text.lower() and "runtime" in text.lower()):
        return EnvironmentProblem(
            f"GPUs requested (gpus={gpus}) but the Docker engine has no GPU support: {NVIDIA_HINT}"
        )
    return EnvironmentProblem(f"could not start a container from {image}: {text}")


def _short(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    text = str(explanation or exc).strip()
    return " ".join(text.split())[:500]
