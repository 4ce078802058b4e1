"""File access that a hostile experiment directory cannot steer (docs/security.md).

Everything below an experiment's mounted folders is written by training code, so the host opens it
relative to a directory handle, one path component at a time, with `O_NOFOLLOW`: a planted symlink,
FIFO, socket or device is reported as `Tampered`, never followed, opened or blocked on. Writes go
through a temporary file created with `O_EXCL` in the same directory and are renamed into place, so
readers see the old or the new file and a planted name can only be replaced, never written through.
Reads are capped: a file larger than the caller allows is an error, not a memory spike.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from runner.errors import InfraError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
DEFAULT_READ_LIMIT = 16 << 20  # JSON documents the host reads back (records, metrics, plans)


class Tampered(InfraError):
    """A path the host reads or writes is a link, FIFO, device or socket where a file belongs (exit 1).

    Only code running in the experiment (plugins, the training) can put one there, so the experiment
    is reported as tampered and nothing is followed.
    """

    exit_code = 1

    def __init__(self, path: Path | str, what: str):
        self.path = str(path)
        super().__init__(f"{path}: {what}; the experiment's files were tampered with and are not followed")


class TooLarge(InfraError):
    """A file the host reads back is larger than it accepts (exit 1)."""

    exit_code = 1


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _parts(rel: str | Path) -> list[str]:
    parts = [p for p in Path(rel).parts if p not in ("", ".")]
    if not parts or any(p in ("..", "/") or "/" in p for p in parts) or Path(rel).is_absolute():
        raise ValueError(f"{rel}: must be a relative path without '..'")
    return parts


@contextlib.contextmanager
def open_dir(root: Path, rel: str | Path | None = None, create: bool = False) -> Iterator[int]:
    """A directory fd for `root/rel`, walking `rel` without following links (`root` itself is trusted).

    `create` makes missing folders (mode 0o777 & ~umask) on the way. Raises Tampered when a
    component is a link or not a directory, FileNotFoundError when one is missing.
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        here = Path(root)
        for part in _parts(rel) if rel not in (None, "", ".") else []:
            here = here / part
            try:
                nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
                nxt = _open_subdir(fd, part, here)
            except OSError as exc:
                raise _tampered_or(exc, fd, part, here) from None
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def _open_subdir(fd: int, part: str, here: Path) -> int:
    try:
        return os.open(part, DIR_FLAGS, dir_fd=fd)
    except OSError as exc:
        raise _tampered_or(exc, fd, part, here) from None


def _tampered_or(exc: OSError, dir_fd: int, name: str, path: Path) -> OSError | Tampered:
    """ELOOP/ENOTDIR from an O_NOFOLLOW open mean something other than a plain file/dir sits there."""
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO, errno.EMLINK):
        try:
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        except OSError:
            return exc
        return Tampered(path, f"is {_kind(mode)}")
    return exc


def _open_file(dir_fd: int, name: str, path: Path) -> int:
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise _tampered_or(exc, dir_fd, name, path) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise Tampered(path, f"is {_kind(mode)}")
    os.set_blocking(fd, True)
    return fd


def read_bytes(root: Path, rel: str | Path, limit: int = DEFAULT_READ_LIMIT) -> bytes:
    """The bytes of the regular file `root/rel`, read without following links; at most `limit` bytes.

    FileNotFoundError when it is missing, Tampered when it is not a regular file, TooLarge when it
    is larger than `limit`.
    """
    *dirs, name = _parts(rel)
    with open_dir(root, Path(*dirs) if dirs else None) as dfd:
        fd = _open_file(dfd, name, Path(root) / rel)
        with os.fdopen(fd, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > limit:
                raise TooLarge(f"{Path(root) / rel}: {size} bytes, more than the {limit} bytes infra reads back")
            data = fh.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"{Path(root) / rel}: more than the {limit} bytes infra reads back")
    return data


@contextlib.contextmanager
def open_read(root: Path, rel: str | Path) -> Iterator:
    """A binary file object for the regular file `root/rel`, opened without following links."""
    *dirs, name = _parts(rel)
    with open_dir(root, Path(*dirs) if dirs else None) as dfd:
        fd = _open_file(dfd, name, Path(root) / rel)
    with os.fdopen(fd, "rb") as fh:
        yield fh


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(root: Path, rel: str | Path, data: bytes, mode: int | None = None) -> None:
    """Replace `root/rel` with `data` atomically: O_EXCL temp file in the same folder, fsync, rename.

    Folders on the way are walked without following links (and created when missing). Whatever
    sits at the target name (a planted link included) is replaced, never written through.
    """
    *dirs, name = _parts(rel)
    with open_dir(root, Path(*dirs) if dirs else None, create=True) as dfd:
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fchmod(fh.fileno(), (0o666 & ~_umask()) if mode is None else mode)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise


def open_append(root: Path, rel: str | Path, mode: int = 0o644) -> int:
    """An O_APPEND fd for `root/rel` (created when missing), never through a link or onto a FIFO."""
    *dirs, name = _parts(rel)
    with open_dir(root, Path(*dirs) if dirs else None, create=True) as dfd:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, mode, dir_fd=dfd)
        except OSError as exc:
            raise _tampered_or(exc, dfd, name, Path(root) / rel) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Tampered(Path(root) / rel, f"is {_kind(st.st_mode)}")
    os.set_blocking(fd, True)
    return fd


def open_truncate(root: Path, rel: str | Path, mode: int = 0o644) -> int:
    """A fresh, empty file at `root/rel` for writing: the old entry (whatever it was) is unlinked first."""
    *dirs, name = _parts(rel)
    with open_dir(root, Path(*dirs) if dirs else None, create=True) as dfd:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dfd)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(name, flags, mode, dir_fd=dfd)


def clear_setid_bits(root: Path) -> list[str]:
    """Remove setuid/setgid bits from every regular file below `root` (links are not followed).

    Returns the relative paths that had them. Run after a training has exited: a file it left with
    such bits must not become a way up for a local user.
    """
    cleared = []
    for dirpath, _dirs, files, dfd in os.fwalk(root, follow_symlinks=False):
        for name in files:
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                fd = os.open(name, READ_FLAGS, dir_fd=dfd)
                try:
                    os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
                finally:
                    os.close(fd)
                cleared.append(os.path.relpath(os.path.join(dirpath, name), root))
    return cleared
