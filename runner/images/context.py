"""Build contexts read from a tree someone else controls: `.dockerignore`, entries, hash, tar.

A workdir belongs to a researcher, while the runner may run as root (under sudo, or for the Master),
so everything here treats the tree as untrusted input (images/README.md, "What enters an image"):

- nothing is followed: a symbolic link is copied as a link, and only when its target lies inside the
  folders that are copied too (so it still works in the image); a link anywhere else, the workdir's
  outside included, is a `ContextError` naming the link and its target;
- FIFOs, sockets and devices are refused, never opened (reading a FIFO blocks forever);
- a file name that is not UTF-8 is refused, its bytes shown escaped;
- files are opened with O_NOFOLLOW and checked against the inode seen while listing, so a file
  swapped for a link between listing and reading is refused rather than read.

Context tars are byte-for-byte reproducible: sorted entries, zero mtimes, uid/gid 0, normalised modes.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from runner.errors import UsageError

SMALL_FILE_LIMIT = 1 << 20  # requirements.txt and .dockerignore: read whole, so bounded
_SPECIAL_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
                  stat.S_IFBLK: "a block device"}  # fmt: skip


class ContextError(UsageError):
    """A file the build context would hold cannot be taken as it is (exit 2): a link leaving the
    copied folders, a special file, a name that is not UTF-8. `path` is the offending host path."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path


def shown(path: str | os.PathLike) -> str:
    """A path as text that can always be printed: bytes that are not UTF-8 appear as `\\xNN`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _check_name(name: str, path: str) -> None:
    """Refuse `name` (the part of `path` that enters the image) when it is not UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ContextError(
            f"{shown(path)}: file name is not valid UTF-8 and cannot enter an image; rename it "
            "(or list it in the workdir's .dockerignore)",
            shown(path),
        ) from None


# --- .dockerignore --------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore glob (Go filepath.Match plus `**`) as a regex over '/'-paths."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):  # "**/" also matches zero directories
                i += 1
                out.append("(?:.*/)?")
            else:
                out.append(".*")
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                if body.startswith("^") or body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class IgnoreRules:
    """Parsed .dockerignore: later rules win; `!pattern` re-includes; a match on a parent excludes."""

    rules: tuple[tuple[bool, re.Pattern], ...] = ()

    @classmethod
    def parse(cls, text: str) -> IgnoreRules:
        rules = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            if negate:
                line = line[1:].strip()
            line = os.path.normpath(line).replace(os.sep, "/").lstrip("/")
            if line in ("", "."):
                continue
            rules.append((negate, _pattern_regex(line)))
        return cls(tuple(rules))

    @classmethod
    def from_dir(cls, root: Path, extra: Iterable[str] = ()) -> IgnoreRules:
        """The rules of `root/.dockerignore` (read like any workdir file: no link out, UTF-8) plus `extra`."""
        data = read_small_file(Path(root), ".dockerignore")
        try:
            text = (data or b"").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ContextError(
                f"{shown(Path(root) / '.dockerignore')}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset "
                f"{exc.start}); save it as UTF-8",
                shown(Path(root) / ".dockerignore"),
            ) from None
        return cls.parse("\n".join(list(extra) + [text]))

    def excluded(self, relpath: str) -> bool:
        """True when `relpath` ('/'-separated, relative to the context root) is left out."""
        parts = relpath.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for negate, regex in self.rules:
            if any(regex.match(p) for p in prefixes):
                result = not negate
        return result


# --- entries --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One member of a build context: a directory, a file on disk, inline bytes, or a symbolic link.

    `fingerprint="stat"` hashes a file by name and size instead of content (wheels: immutable by name,
    too big to read on every decision). `inode` is (st_dev, st_ino) as listed: the file read later
    must be that one. `link` is the (relative) target of a link entry.
    """

    arcname: str
    source: Path | None = None
    data: bytes | None = None
    is_dir: bool = False
    executable: bool = False
    fingerprint: str = "content"
    link: str | None = None
    inode: tuple[int, int] | None = None

    def size(self) -> int:
        if self.is_dir or self.link is not None:
            return 0
        return len(self.data) if self.data is not None else self.source.stat().st_size

    def digest(self) -> str:
        if self.is_dir:
            return "dir"
        if self.link is not None:
            return f"link:{self.link}"
        if self.fingerprint == "stat":
            return f"size:{self.size()}"
        h = hashlib.sha256()
        if self.data is not None:
            h.update(self.data)
        else:
            with open_entry(self) as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()

    def kind(self) -> str:
        return "d" if self.is_dir else "l" if self.link is not None else "x" if self.executable else "f"


def open_regular(path: Path, inode: tuple[int, int] | None = None) -> IO[bytes]:
    """Open a regular file for reading without following a final link or blocking on a FIFO.

    With `inode`, the opened file must be the one listed earlier (a swapped-in link, FIFO or other
    file is refused). Raises ContextError naming the path.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if os.path.islink(path):
            raise ContextError(
                f"{shown(path)}: became a symbolic link while the context was read; not followed", shown(path)
            ) from None
        raise ContextError(f"{shown(path)}: cannot be read ({exc.strerror})", shown(path)) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (inode is not None and (st.st_dev, st.st_ino) != tuple(inode)):
        os.close(fd)
        raise ContextError(f"{shown(path)}: changed while the build context was read; run again", shown(path))
    return os.fdopen(fd, "rb")


def open_entry(entry: Entry) -> IO[bytes]:
    """Open a file entry: checked against its listed inode when it came from a tree walk; entries
    without one (wheels, the project's own files) come from places the node's admin controls."""
    if entry.inode is None:
        return open(entry.source, "rb")
    return open_regular(entry.source, entry.inode)


def special_file_error(path: Path, mode: int) -> ContextError:
    what = _SPECIAL_KINDS.get(stat.S_IFMT(mode), "not a regular file")
    return ContextError(
        f"{shown(path)}: is {what}; infra takes only files, folders and links from a workdir and never opens "
        "anything else: remove it (or list it in the workdir's .dockerignore)",
        shown(path),
    )


def _inside(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def link_entry(arcname: str, path: Path, roots: Iterable[str], why: str) -> Entry:
    """A link entry for the link at `path`, when it resolves inside `roots`; else ContextError.

    The stored target is relative to the link's folder and points at the fully resolved target, so
    the link works in the image wherever the copied folders land. `why` says what the roots are.
    """
    text = os.readlink(path)
    resolved = os.path.realpath(path)
    if not _inside(resolved, roots):
        via = (
            f" (resolves to {shown(resolved)})"
            if os.path.normpath(os.path.join(os.path.dirname(path), text)) != resolved
            else ""
        )
        raise ContextError(
            f"{shown(path)}: symbolic link to {shown(text)}{via}, outside {why}; "
            "infra does not follow links out of there: replace the link with a copy of the file",
            shown(path),
        )
    return Entry(arcname, link=os.path.relpath(resolved, os.path.dirname(path)))


def collect_tree(
    root: Path,
    prefix: str,
    ignore: IgnoreRules,
    rel_base: str = "",
    fingerprint: str = "content",
    link_roots: Iterable[str] | None = None,
    link_why: str = "",
) -> list[Entry]:
    """Entries for everything under the real directory `root` (itself included) at `prefix`, skipping
    what `ignore` excludes (matched against `rel_base/relative path`).

    Nothing is followed: links become link entries when they resolve inside `link_roots` (default:
    `root`) and a ContextError otherwise; special files and names that are not UTF-8 are ContextErrors.
    """
    root = Path(os.path.realpath(root))
    roots = [os.path.realpath(r) for r in (link_roots if link_roots is not None else [root])]
    why = link_why or f"{shown(root)}"
    entries = [Entry(prefix, is_dir=True)]
    pending = [("", root)]
    while pending:
        rel_dir, folder = pending.pop()
        with os.scandir(folder) as it:
            children = sorted(it, key=lambda d: d.name)
        for child in children:
            rel = f"{rel_dir}/{child.name}" if rel_dir else child.name
            if ignore.excluded(f"{rel_base}/{rel}" if rel_base else rel):
                continue
            path = Path(child.path)
            _check_name(rel, child.path)
            st = child.stat(follow_symlinks=False)
            arc = f"{prefix}/{rel}"
            if stat.S_ISLNK(st.st_mode):
                entries.append(link_entry(arc, path, roots, why))
            elif stat.S_ISDIR(st.st_mode):
                entries.append(Entry(arc, is_dir=True))
                pending.append((rel, path))
            elif stat.S_ISREG(st.st_mode):
                entries.append(
                    Entry(arc, source=path, executable=bool(st.st_mode & stat.S_IXUSR), fingerprint=fingerprint,
                          inode=(st.st_dev, st.st_ino))
                )  # fmt: skip
            else:
                raise special_file_error(path, st.st_mode)
    return entries


def read_small_file(root: Path, name: str, limit: int = SMALL_FILE_LIMIT) -> bytes | None:
    """The bytes of `root/name` (a regular file, or a link resolving to one inside `root`), None when
    absent. Anything else (a link out of `root`, a FIFO, more than `limit` bytes) is a ContextError."""
    path = Path(root) / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    _check_name(name, str(path))
    if stat.S_ISLNK(st.st_mode):
        real_root = os.path.realpath(root)
        link_entry(name, path, [real_root], f"the workdir {shown(real_root)}")  # raises when it leaves
        target = Path(os.path.realpath(path))
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            return None
        path = target
    if stat.S_ISDIR(st.st_mode):
        raise ContextError(f"{shown(path)}: is a folder, expected a file", shown(path))
    if not stat.S_ISREG(st.st_mode):
        raise special_file_error(path, st.st_mode)
    with open_regular(path, (st.st_dev, st.st_ino)) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ContextError(f"{shown(path)}: larger than {limit} bytes; is it the right file?", shown(path))
    return data


# --- hash and tar ---------------------------------------------------------------------------------


def normalise(entries: Iterable[Entry]) -> list[Entry]:
    """Entries sorted by name, later duplicates winning."""
    by_name: dict[str, Entry] = {}
    for e in entries:
        by_name[e.arcname.strip("/")] = e
    return [by_name[name] for name in sorted(by_name)]


def context_hash(entries: Iterable[Entry], extra: Mapping[str, str] | None = None) -> str:
    """sha256 over the sorted (name, kind, content digest) of the entries plus `extra` items.

    Links are hashed by their target text, never by what they point to."""
    h = hashlib.sha256()
    for key, value in sorted((extra or {}).items()):
        h.update(f"extra\0{key}\0{value}\n".encode())
    for e in normalise(entries):
        h.update(f"{e.arcname.strip('/')}\0{e.kind()}\0{e.digest()}\n".encode())
    return h.hexdigest()


def write_context_tar(entries: Iterable[Entry], fileobj: IO[bytes]) -> None:
    """Write the entries as an uncompressed tar, reproducibly: sorted names, mtime 0, uid/gid 0,
    no user/group names, modes 0755 for dirs and executables and 0644 otherwise, links as links."""
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in normalise(entries):
            info = tarfile.TarInfo(e.arcname.strip("/"))
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if e.is_dir:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            elif e.link is not None:
                info.type = tarfile.SYMTYPE
                info.linkname = e.link
                info.mode = 0o777
                tar.addfile(info)
            elif e.data is not None:
                info.mode = 0o755 if e.executable else 0o644
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                info.mode = 0o755 if e.executable else 0o644
                with open_entry(e) as fh:
                    info.size = os.fstat(fh.fileno()).st_size
                    tar.addfile(info, fh)


def context_tar_bytes(entries: Iterable[Entry]) -> bytes:
    """The context tar in memory (small contexts and tests; big ones go through a temp file)."""
    buf = io.BytesIO()
    write_context_tar(entries, buf)
    return buf.getvalue()
