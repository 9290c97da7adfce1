"""The disk a job's folder is on, when a run or launch fails: full, or read-only (blocking reads: call them in a
thread). Its operator's to mend, so what fails for it says so, and the queue waits instead of failing its jobs."""

from __future__ import annotations

import errno
import os
from pathlib import Path

# Under this much free space, the disk is what failed a run: the full disk cut swift's log short, the traceback
# that named it too (hunt BW: "swift exited with code 1:     (run_dir / "runs" / name).w").
DISK_FULL_BYTES = 64 * 1024 * 1024

_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def free_bytes(folder: str | Path) -> int | None:
    """The bytes this process may still write on `folder`'s disk; None when it cannot be read. Root writes into
    the blocks a file system keeps back (ext4's 5%), which others see as full."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def whole_disk(exc: OSError, output_root: Path) -> bool:
    """Whether a launch failed for OUTPUT_ROOT's disk as a whole, full or read-only there (every launch would fail
    alike), not for the job's folder alone (a mount of its own, say: that job's run fails). A quota (EDQUOT) is
    the server user's, every job's."""
    if exc.errno not in _DISK_ERRNOS:
        return False
    if exc.errno == errno.EDQUOT:
        return True
    try:
        st = os.statvfs(output_root)
    except OSError:
        return False
    if exc.errno == errno.EROFS:
        return bool(st.f_flag & os.ST_RDONLY)
    free = free_bytes(output_root)
    return free is not None and free < DISK_FULL_BYTES


def launch_error(exc: OSError, log_dir: Path, again: str = "create the job again", what: str = "run") -> str:
    """What a launch that failed says: the folder it writes in, and what to change where that is the disk (`again`:
    what to do then: a job that never saved a checkpoint cannot be resumed, hunt BW)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"the {what} could not be started: no space left for the job's logs ({log_dir}): free space on the "
                f"disk of OUTPUT_ROOT, then {again}")  # fmt: skip
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"the {what} could not be started: the job's logs folder cannot be written ({log_dir}: "
                f"{exc.strerror}): OUTPUT_ROOT must be writable by the server")  # fmt: skip
    return f"the {what}'s runner could not be started: {exc}"
