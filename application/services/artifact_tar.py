"""Reading a folder without ever following a link: the walk the artifact listing uses, and a folder streamed as
an uncompressed tar.

The tar is written as it is read: a header from `TarInfo.tobuf`, the file's blocks, the next header, so memory
stays at one chunk whatever the folder holds, and nothing is built on disk. Everything is opened relative to an
open folder fd with O_NOFOLLOW; a symlink is stored as a link only when it points inside the folder being sent
(`tarfile`'s "data" filter refuses any other on extraction), otherwise it is left out. Synchronous: Starlette
runs each step of the generator in a worker thread.
"""

from __future__ import annotations

import os
import stat
import tarfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

from application.services.path_sandbox import MAX_COMPONENTS

CHUNK = 512 * 1024
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_PATH = getattr(os, "O_PATH", 0)  # (Linux: an fd that reads nothing, for passing through a folder or resolving)
PATH_FLAGS = (_O_PATH or os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted in the folder must not hang the open; it changes nothing for regular files.
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# A step of the tar stream returns at least this often, with what it has (b"" when nothing): only between
# steps does a client's hang-up end the stream and give its download slot back.
YIELD_SECONDS = 0.5
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


class OwnedFd:
    """An fd (a folder, a file) closed when its owner is dropped, even if the body that uses it never starts."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._close = weakref.finalize(self, os.close, fd)

    def close(self) -> None:
        self._close()


def walk(dir_fd: int, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, str, int, os.stat_result]]:
    """(relative path, name, parent fd, lstat) of everything under dir_fd, parents first, links never
    followed, at most MAX_COMPONENTS deep. The parent fd is valid only until the next item."""
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # removed meanwhile (save_total_limit)
            rel = prefix + entry.name
            yield rel, entry.name, dir_fd, st
            if stat.S_ISDIR(st.st_mode) and depth + 1 < MAX_COMPONENTS:
                try:
                    child = os.open(entry.name, DIR_FLAGS, dir_fd=dir_fd)
                except OSError:
                    continue
                try:
                    yield from walk(child, rel + "/", depth + 1)
                finally:
                    os.close(child)


_PROC_FD = Path("/proc/self/fd")


def real_path(path: str | Path) -> Path | None:
    """What `path` leads to, every link followed, or None when it leads nowhere (missing, a loop): resolved by
    the kernel, which follows at most 40 links in one lookup, where os.path.realpath follows any number (a job's
    chain of 4,000 links, each up to 4,000 bytes of `a/a/...`, took a listing 68 s of CPU, and six of them every
    thread `asyncio.to_thread` has: other owners' downloads waited). O_PATH reads nothing and opens nothing (a
    FIFO, a device)."""
    if not _O_PATH or not _PROC_FD.is_dir():
        try:
            return Path(os.path.realpath(path, strict=True))
        except (OSError, RuntimeError):
            return None
    try:
        fd = os.open(path, _O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        real = os.readlink(_PROC_FD / str(fd))
        if not real.startswith("/"):
            return None
        if real.endswith(" (deleted)"):
            # The kernel's mark of an unlinked file, or a name that truly ends so ("report (deleted)"): the
            # latter is the very file opened.
            try:
                named, opened = os.stat(real, follow_symlinks=False), os.fstat(fd)
            except OSError:
                return None
            if (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
                return None
    except OSError:
        return None
    finally:
        os.close(fd)
    return Path(real)


def link_inside(root: Path, rel: str, name: str, parent_fd: int) -> str | None:
    """Where the symlink `rel` (under the real folder `root`) points, relative to `root`, if inside it (and
    there: a link to nothing is left out)."""
    try:
        text = os.readlink(name, dir_fd=parent_fd)
    except OSError:
        return None
    # (a string: pathlib's parsing of a link's 4,000 bytes of `a/a/...` cost more than the lookup)
    real = real_path(os.path.join(root, rel.rpartition("/")[0], text))
    return str(real.relative_to(root)) if real is not None and root in real.parents else None


def _header(name: str, st: os.stat_result, kind: bytes, size: int = 0, linkname: str = "") -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, linkname
    # Permission bits only: members are root's (uid 0), so a set-user-ID bit a job set on its file made a
    # set-user-ID-root program wherever root extracted the tar with GNU tar (its default keeps owner and mode).
    info.mode, info.mtime = stat.S_IMODE(st.st_mode) & 0o777, int(st.st_mtime)
    info.uid = info.gid = 0
    info.uname = info.gname = ""  # the server's user names are nobody's business
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _file_blocks(fd: int, size: int) -> Iterator[bytes]:
    """Exactly `size` bytes, then the padding to a whole block. A file that shrank meanwhile is padded with
    zeros (as GNU tar does, "file shrank"), one that grew is cut: the header already said how long it is."""
    sent = 0
    while sent < size:
        data = os.read(fd, min(CHUNK, size - sent)) or b"\0" * min(CHUNK, size - sent)
        sent += len(data)
        yield data
    yield b"\0" * (-size % _BLOCK)


def tar_chunks(folder: OwnedFd, real: Path, name: str) -> Iterator[bytes]:
    """The folder open as `folder` (real path `real`), as a tar whose entries all lie under `name/`."""
    out = bytearray()
    written = 0
    due = time.monotonic() + YIELD_SECONDS
    try:
        out += _header(name, os.fstat(folder.fd), tarfile.DIRTYPE)
        for rel, entry, parent_fd, st in walk(folder.fd):
            if time.monotonic() >= due:
                # What it has, even b"": entries left out (links leading out, FIFOs, files that would not open)
                # write nothing, and a step that never ended held its thread and its download slot however long
                # ago its client hung up (200,000 links leading out: 16 s of CPU, the slot held throughout).
                due = time.monotonic() + YIELD_SECONDS
                written += len(out)
                yield bytes(out)
                out.clear()
            member = f"{name}/{rel}"
            if stat.S_ISDIR(st.st_mode):
                out += _header(member, st, tarfile.DIRTYPE)
            elif stat.S_ISLNK(st.st_mode):
                target = link_inside(real, rel, entry, parent_fd)
                if target is not None:
                    linkname = os.path.relpath(real / target, (real / rel).parent)
                    out += _header(member, st, tarfile.SYMTYPE, linkname=linkname)
            elif stat.S_ISREG(st.st_mode):
                try:
                    fd = os.open(entry, FILE_FLAGS, dir_fd=parent_fd)
                except OSError:
                    continue  # removed meanwhile
                try:
                    fst = os.fstat(fd)
                    if not stat.S_ISREG(fst.st_mode):
                        continue
                    out += _header(member, fst, tarfile.REGTYPE, fst.st_size)
                    for block in _file_blocks(fd, fst.st_size):
                        out += block
                        if len(out) >= CHUNK:
                            written += len(out)
                            yield bytes(out)
                            out.clear()
                finally:
                    os.close(fd)
            if len(out) >= CHUNK:
                written += len(out)
                yield bytes(out)
                out.clear()
    finally:
        folder.close()
    # The end: two zero blocks, then zeros to a whole record, as tarfile writes it.
    end = written + len(out) + 2 * _BLOCK
    out += b"\0" * (2 * _BLOCK + (-end % _RECORD))
    yield bytes(out)
