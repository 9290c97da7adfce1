"""Opening a file that a user or a trainer may have put in place: only a regular file, and never waiting on it.

A FIFO where a data set, a media list or a run's logging.jsonl is read held the reader for ever (in a worker
thread: a few such requests took every thread a worker has); a device (/dev/zero behind a link) filled its memory.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO


def open_regular(path: Path | str, *, follow: bool = True) -> BinaryIO:
    """`path` opened for reading in binary; OSError (EINVAL, "not a regular file") for anything else. `follow`
    False: a link as the file itself is refused too (ELOOP)."""
    # (O_NONBLOCK: the open of a FIFO returns at once; it changes nothing for a regular file.)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return os.fdopen(fd, "rb")
