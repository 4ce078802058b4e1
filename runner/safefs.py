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
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from runner.errors import InfraError

log = logging.getLogger(__name__)

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


# --- trees a container made: walked iteratively, bounded, never through a link ------------------------
#
# A training can leave a tree of any shape: thousands of levels, millions of entries, folders without
# read or search permission, links anywhere. Recursion in Python (os.walk/os.fwalk on 3.11,
# shutil.rmtree) raises RecursionError on such a tree, so every walk here keeps its own stack and
# holds ONE directory descriptor at a time: a child is opened relative to its parent with O_NOFOLLOW,
# and the way back up is "..", checked against the parent's (device, inode) noted on the way down, so
# depth costs neither the Python stack nor descriptors. The checking walk (setuid/setgid bits) is
# bounded by the three limits below and reports, never hides, what it could not check; removal and
# sizing are unbounded (a tree a container made must always be removable).

WALK_MAX_DEPTH = 256  # folder levels below a checked folder; deeper subtrees are not checked (the attempt fails)
WALK_MAX_ENTRIES = 1_000_000  # entries one check of an experiment looks at (all its output folders together)
WALK_MAX_SECONDS = 120.0  # wall clock of one check of an experiment (it runs under the experiment's final lock)
SHOWN_PATH_CHARS = 200  # a path in a message is cut to this many characters (a deep path is kilobytes)


class TreeChanged(InfraError):
    """A folder moved or filled up while the host walked or removed the tree (exit 1)."""

    exit_code = 1


class RemoveFailed(InfraError):
    """A tree could not be removed (exit 1)."""

    exit_code = 1


def shown_path(path: Path | str, limit: int = SHOWN_PATH_CHARS) -> str:
    """`path` for a one-line message: its head (where it is) and tail around '…' when it is longer
    than `limit`."""
    text = str(path)
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    return f"{text[:head]}…{text[-(limit - head - 1) :]}"


@dataclass
class WalkBudget:
    """The bounds of one check; one budget spans all the folders of an experiment (entries, time)."""

    depth: int = WALK_MAX_DEPTH
    entries: int = WALK_MAX_ENTRIES
    seconds: float = WALK_MAX_SECONDS
    seen: int = 0
    deadline: float | None = None

    def charge(self, root: Path, names: list[str]) -> None:
        """Count one entry of the folder `root/names…`; _OutOfBudget when the entries or the time are spent."""
        if self.deadline is None:
            self.deadline = time.monotonic() + self.seconds
        self.seen += 1
        if self.seen > self.entries:
            why = f"more than {self.entries} entries to check (limit WALK_MAX_ENTRIES)"
            raise _OutOfBudget(root.joinpath(*names), why)
        if time.monotonic() > self.deadline:
            raise _OutOfBudget(root.joinpath(*names), f"not checked within {self.seconds:g} s (limit WALK_MAX_SECONDS)")


class _OutOfBudget(Exception):
    def __init__(self, where: Path, why: str):
        super().__init__(f"{shown_path(where)}: {why}")


@dataclass
class Checked:
    """What `clear_setid_bits` did: the files it cleared, and why part of the tree was not checked."""

    cleared: list[str] = field(default_factory=list)  # paths relative to the checked folder
    unchecked: str | None = None  # one line naming the path and the limit; None when all was checked


@dataclass
class _Level:
    ident: tuple[int, int]  # (st_dev, st_ino), to check the way back up
    pending: list[str] | None = None  # subfolders still to visit (None: not listed yet)


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _chmod_nofollow(dir_fd: int, name: str, mode_of: Callable[[int], int], want: Callable[[int], bool]) -> bool:
    """Change the mode of `name` itself (never a link's target) when `want(its mode)`; whether it did.

    O_PATH needs no permission on the entry, and chmod through /proc/self/fd acts on exactly the inode
    opened (Linux has no lchmod).
    """
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        mode = os.fstat(fd).st_mode
        if not want(mode):
            return False
        os.chmod(f"/proc/self/fd/{fd}", mode_of(mode))
        return True
    finally:
        os.close(fd)


def _open_subdir_fixing(dir_fd: int, name: str, fix: bool) -> int | None:
    """A descriptor of the subfolder `name` (O_NOFOLLOW); None when it is gone or no longer a folder.

    A folder its owner left without read or search permission is given u+rwx first when `fix` (the
    owner is us, or we are root); otherwise PermissionError.
    """
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:
        if not fix:
            raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a link since it was listed: not ours to follow
            return None
        raise
    _chmod_nofollow(dir_fd, name, lambda m: stat.S_IMODE(m) | 0o700, stat.S_ISDIR)
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def _walk(
    fd: int,
    top: Path,
    visit: Callable[[int, list[str], os.DirEntry], None],
    *,
    depth: int | None = None,
    too_deep: Callable[[list[str]], None] = lambda names: None,
    charge: Callable[[list[str]], None] = lambda names: None,
    fix: bool = False,
    remove: bool = False,
) -> None:
    """Depth first over the folder open as `fd` (taken over and closed), one descriptor at a time.

    `visit(dir_fd, names, entry)` gets every entry that is not a folder (`names`: the folder's path
    below `top`, as components). Folders more than `depth` levels down are not entered:
    `too_deep(their names)` is told instead. `charge(names)` runs once per entry (and may raise to
    stop). With `fix`, a folder without read/search permission for its owner (us) gets u+rwx, else
    PermissionError; without, it is left out. With `remove`, each folder is removed once emptied
    (`top` itself is left to the caller). A folder that is not where it was on the way back up is
    TreeChanged.
    """
    stack = [_Level(_ident(os.fstat(fd)))]
    names: list[str] = []
    try:
        while True:
            level = stack[-1]
            if level.pending is None:
                level.pending = _list(fd, top, names, visit, charge, fix, remove)
            if level.pending:
                child = level.pending.pop()
                if depth is not None and len(names) >= depth:
                    too_deep([*names, child])
                    continue
                try:
                    child_fd = _open_subdir_fixing(fd, child, fix)
                except PermissionError:
                    if not fix:
                        continue  # a count (tree_bytes) leaves out what it may not read
                    raise PermissionError(errno.EACCES, "permission denied", str(top.joinpath(*names, child))) from None
                if child_fd is None:
                    if remove:
                        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                            os.unlink(child, dir_fd=fd)
                    continue
                stack.append(_Level(_ident(os.fstat(child_fd))))
                names.append(child)
                os.close(fd)
                fd = child_fd
                continue
            stack.pop()
            if not stack:
                return
            up = os.open("..", DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up
            if _ident(os.fstat(fd)) != stack[-1].ident:
                raise TreeChanged(f"{shown_path(top.joinpath(*names))}: moved while infra walked it; nothing followed")
            name = names.pop()
            if remove:
                try:
                    os.rmdir(name, dir_fd=fd)
                except OSError as exc:
                    if exc.errno != errno.ENOTEMPTY:
                        raise
                    raise TreeChanged(
                        f"{shown_path(top.joinpath(*names, name))}: written to while infra removed it; "
                        "stop what writes there and remove it again"
                    ) from None
    finally:
        os.close(fd)


def _list(fd, top, names, visit, charge, fix, remove) -> list[str]:
    """List one folder: visit its non-folder entries, return its subfolders."""
    if remove and fix:
        st = os.fstat(fd)
        if stat.S_IMODE(st.st_mode) & 0o700 != 0o700 and os.geteuid() in (st.st_uid, 0):
            with contextlib.suppress(PermissionError):  # not ours: the unlinks below say so
                os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)
    entries = []
    with os.scandir(fd) as it:
        for entry in it:  # charged while listing: a huge folder stops the check before it fills memory
            charge(names)
            entries.append(entry)
    subdirs = []
    for entry in entries:  # acted on after listing: removal must not change a folder being read
        if entry.is_dir(follow_symlinks=False):
            subdirs.append(entry.name)
        else:
            visit(fd, names, entry)
    subdirs.reverse()  # popped from the end: visited in listing order
    return subdirs


def clear_setid_bits(root: Path, budget: WalkBudget | None = None) -> Checked:
    """Remove setuid/setgid bits from every regular file below `root` (no link followed, `root` included).

    Run after a training has exited: a file it left with such bits must not become a way up for a
    local user. The walk is bounded (`budget`, default WALK_MAX_*): a subtree deeper than the depth
    limit is skipped and the rest still checked; once entries or time are spent the walk stops.
    Either way `Checked.unchecked` says where and which limit, and the caller fails the attempt.
    FileNotFoundError when `root` is missing, Tampered when it is a link or not a folder.
    """
    budget = budget or WalkBudget()
    result = Checked()
    mode = os.lstat(root).st_mode
    if not stat.S_ISDIR(mode):
        raise Tampered(root, f"is {_kind(mode)}")
    parent_fd = os.open(root.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _open_subdir_fixing(parent_fd, root.name, fix=True)
    finally:
        os.close(parent_fd)
    if fd is None:
        raise FileNotFoundError(errno.ENOENT, "gone while being checked", str(root))
    setid = stat.S_ISUID | stat.S_ISGID

    def visit(dir_fd: int, names: list[str], entry: os.DirEntry) -> None:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            return
        if not (stat.S_ISREG(st.st_mode) and st.st_mode & setid):
            return
        try:
            if _chmod_nofollow(dir_fd, entry.name, lambda m: stat.S_IMODE(m) & ~setid, stat.S_ISREG):
                result.cleared.append("/".join([*names, entry.name]))
        except PermissionError:
            where = str(root.joinpath(*names, entry.name))
            raise PermissionError(errno.EPERM, "its mode cannot be changed", where) from None

    def too_deep(names: list[str]) -> None:
        if result.unchecked is None:
            why = f"more than {budget.depth} folder levels deep (limit WALK_MAX_DEPTH)"
            result.unchecked = f"{shown_path(root.joinpath(*names))}: {why}"

    try:
        budget.charge(root, [])
        _walk(fd, root, visit, depth=budget.depth, too_deep=too_deep, charge=lambda n: budget.charge(root, n), fix=True)
    except _OutOfBudget as exc:
        result.unchecked = str(exc)
    except PermissionError as exc:
        result.unchecked = f"{shown_path(exc.filename or root)}: cannot be checked ({exc.strerror})"
    except TreeChanged as exc:
        result.unchecked = exc.message
    return result


def remove_entry(dir_fd: int, name: str, where: Path) -> None:
    """Remove the entry `name` of the folder `dir_fd` whatever it is, of any depth, following no link.

    A link or file is unlinked; a folder is emptied iteratively (`_walk`) and removed. Folders its
    owner left without write or search permission are opened up first. A missing entry is fine.
    RemoveFailed or TreeChanged name `where` (or the path below it that failed) and what to do.
    """
    try:
        _remove_entry(dir_fd, name, where)
    except OSError as exc:
        raise RemoveFailed(
            f"{shown_path(exc.filename or where)}: cannot be removed ({exc.strerror}); remove it by hand"
        ) from None


def _remove_entry(dir_fd: int, name: str, where: Path) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        return
    fd = _open_subdir_fixing(dir_fd, name, fix=True)
    if fd is None:  # gone, or replaced by a file or link since the stat: unlink that, nothing followed
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        return
    if _ident(os.fstat(fd)) != _ident(st):
        os.close(fd)
        raise TreeChanged(f"{shown_path(where)}: replaced while infra removed it; nothing followed")

    def unlink(parent_fd: int, names: list[str], entry: os.DirEntry) -> None:
        try:
            os.unlink(entry.name, dir_fd=parent_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(where.joinpath(*names, entry.name))) from None

    _walk(fd, where, unlink, fix=True, remove=True)
    os.rmdir(name, dir_fd=dir_fd)


def remove_tree(path: Path, ignore_errors: bool = False) -> None:
    """Remove `path` (a file, a link itself, or a folder tree of any depth) without following links.

    `path`'s parent is trusted (opened as given); from its last component on nothing is followed.
    A missing `path` is fine. Failures are RemoveFailed or TreeChanged naming the path; with
    `ignore_errors` they are logged as a warning instead (a cleanup in a `finally`).
    """
    path = Path(path)
    try:
        try:
            parent_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise RemoveFailed(f"{shown_path(path)}: cannot be removed ({exc.strerror}); remove it by hand") from None
        try:
            remove_entry(parent_fd, path.name, path)
        finally:
            os.close(parent_fd)
    except (RemoveFailed, TreeChanged) as exc:
        if not ignore_errors:
            raise
        log.warning("%s", exc.message)


def tree_bytes(root: Path) -> int:
    """Bytes of the regular files below `root`, walked iteratively without following links.

    Unbounded (it is what removing the tree goes through anyway); folders that cannot be read are
    left out of the count, and nothing is changed.
    """
    total = 0

    def add(dir_fd: int, names: list[str], entry: os.DirEntry) -> None:
        nonlocal total
        with contextlib.suppress(OSError):
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                total += st.st_size

    try:
        fd = os.open(root, DIR_FLAGS)
    except OSError:
        return 0
    with contextlib.suppress(OSError, TreeChanged):  # a partial count is still the best estimate
        _walk(fd, Path(root), add)
    return total
