"""Opening a job's logs, and the small files beside them, only where they are: never through a link.

A job's folder is its owner's, and on shared storage they may put links in it. The server's own processes write
the logs there and the API reads them back, so a link (the log itself, or its `logs` folder) would have a run
write wherever the server may (into another owner's folder, over its own files) or a log read return any file
(/etc/passwd as a "log"). Each open here refuses a link as the file itself (O_NOFOLLOW) and on the way to its
folder (the folder's real path must be the path as given, which holds for a job's: its output folder is stored
resolved at create; but for the link OUTPUT_ROOT's move leaves at its old place). Nor anything but a regular
file: a FIFO made in a log's place held each reader for ever (a few of them took every thread an API worker
has). A refusal is an OSError with errno ELOOP.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO, Literal

_FLAGS = {"r": os.O_RDONLY, "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND, "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC}

# OUTPUT_ROOT as this process's settings name it (`allow_moved_root`), resolved at each look: it may move while a
# runner runs.
_ROOTS: list[str] = []


def allow_moved_root(output_root: Path | str) -> None:
    """A job folder stored before OUTPUT_ROOT moved, reached through the link left at its old place (the README's
    way to move it), is its own all the same: after the move, every earlier job's run, log and export was refused
    as "a symbolic link leads to its folder" (hunt CE). Called by each process with its settings."""
    _ROOTS[:] = [os.path.abspath(output_root)]


def _moved(folder: str, resolved: str) -> bool:
    """Whether `folder` lies outside OUTPUT_ROOT as it is now (a path stored before it moved: none stored since
    does), and leads into it through a link at OUTPUT_ROOT's old place alone: the rest of the path is as stored (a
    link inside the root is an owner's, and may lead into another owner's folder)."""
    for configured in _ROOTS:
        root = os.path.realpath(configured)
        if not resolved.startswith(root + os.sep) or folder.startswith(root + os.sep):
            continue
        rest = resolved[len(root) :]
        if folder.endswith(rest) and os.path.realpath(folder[: -len(rest)]) == root:
            return True
    return False


def in_place(folder: str) -> bool:
    """Whether no link leads to `folder` (absolute), but the one OUTPUT_ROOT's move left (`allow_moved_root`)."""
    resolved = os.path.realpath(folder)
    return resolved == folder or _moved(folder, resolved)


def open_in_place(path: Path | str, mode: Literal["r", "a", "w"] = "r") -> BinaryIO:
    folder = os.path.dirname(os.path.abspath(path))
    if not in_place(folder):
        raise OSError(errno.ELOOP, "a symbolic link leads to its folder: the server reads and writes a job's logs "
                      "only in the job's own folder", str(path))  # fmt: skip
    # (O_NONBLOCK: the open of a FIFO returns, or fails, at once; it changes nothing for a regular file.)
    fd = os.open(path, _FLAGS[mode] | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.ELOOP, "not a regular file: the server reads and writes a job's logs only as files in "
                      "the job's own folder", str(path))  # fmt: skip
    return os.fdopen(fd, "rb" if mode == "r" else "ab" if mode == "a" else "wb")


def replace_in_place(path: Path, data: bytes) -> None:
    """Write `data` as `path` whole (a temp file beside it, then renamed), through `open_in_place`; a write that
    fails (a full disk) leaves no empty temp file behind."""
    tmp = path.with_suffix(".tmp")
    try:
        with open_in_place(tmp, "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def linked_log(path: Path | str) -> str:
    """Why a run with this log (refused by `open_in_place`) did not start."""
    return (f"its log {path} is a symbolic link (or one leads to it): the server writes and reads a job's logs only "
            "in its own folder: replace the link with a file")  # fmt: skip


def path_taken(path: Path | str) -> bool:
    """Whether anything has this name, a link leading nowhere included (it would have a writer create the file it
    leads to). An error other than a missing name is raised (os.path.lexists took a name too long for the system
    for a free one)."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def is_linked(error: OSError) -> bool:
    """The refusal of `open_in_place` (or of O_NOFOLLOW on a link)."""
    return error.errno == errno.ELOOP


def size_in_place(path: Path | str) -> int | None:
    """The file's size, None when it is missing or a link (one lstat: cheap enough for the event loop)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None
