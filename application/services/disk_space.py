"""The disk a job's folder is on, when a run or launch fails: full, or read-only (blocking reads: call them in a
thread). Its operator's to mend, so what fails for it says so, and the queue waits instead of failing its jobs."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

# Under this much free space, the disk is what failed a run: the full disk cut swift's log short, the traceback
# that named it too (hunt BW: "swift exited with code 1:     (run_dir / "runs" / name).w").
DISK_FULL_BYTES = 64 * 1024 * 1024

_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def free_bytes(folder: str | Path) -> int | None:
    """The bytes this process may still write on `folder`'s disk, 0 when no file can be made there any more (out
    of inodes, with bytes to spare: review BZ); None when it cannot be read. Root writes into the blocks a file
    system keeps back (ext4's 5%), which others see as full."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    root = os.geteuid() == 0
    if st.f_files and not (st.f_ffree if root else st.f_favail):  # (f_files 0: a file system with no inode count)
        return 0
    return (st.f_bfree if root else st.f_bavail) * st.f_frsize


def write_refused(output_root: Path) -> OSError | None:
    """The error a file written in OUTPUT_ROOT gets now for its disk (full, out of inodes, over quota, read-only),
    or None when one can be written there (or fails for anything else: not the disk's). A probe, written and
    removed: what a launch does first."""
    try:
        fd, name = tempfile.mkstemp(prefix=".swift-api-disk-probe-", dir=output_root)
        try:
            try:
                os.write(fd, b"\0" * 4096)
            finally:
                os.close(fd)  # (on NFS a full disk may be told here)
        finally:
            os.unlink(name)
    except OSError as exc:
        return exc if exc.errno in _DISK_ERRNOS else None
    return None


def disk_state(exc: OSError, output_root: Path) -> str:
    """How OUTPUT_ROOT's disk stands, after `exc`: "read-only", "full (12 KiB free)", and so on."""
    if exc.errno == errno.EROFS:
        return "read-only"
    if exc.errno == errno.EDQUOT:
        return "over the server user's quota"
    free = free_bytes(output_root)
    return "full" if free is None else f"full ({room(free)})"


def disk_trouble(output_root: Path) -> str | None:
    """How OUTPUT_ROOT's disk keeps runs from starting, read from its figures alone: "read-only", "full (12 KiB
    free)" (under DISK_FULL_BYTES, or a hundredth of a disk smaller than 6.4 GB: a small volume is not full at
    its size); None when it does not, or cannot be read. No write: a look each pass."""
    try:
        st = os.statvfs(output_root)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return "read-only"
    free = free_bytes(output_root)
    full = free is not None and free < min(DISK_FULL_BYTES, st.f_blocks * st.f_frsize // 100)
    return f"full ({room(free or 0)})" if full else None


def start_refused(output_root: Path) -> str | None:
    """`disk_trouble`, or how a probe written there was refused: what holds the starts (a quota the figures do not
    show refuses the probe)."""
    if trouble := disk_trouble(output_root):
        return trouble
    refused = write_refused(output_root)
    return disk_state(refused, output_root) if refused is not None else None


def whole_disk(exc: OSError, output_root: Path) -> bool:
    """Whether a launch failed for OUTPUT_ROOT's disk as a whole, full, over quota or read-only there (every launch
    would fail alike), not for the job's folder alone (a mount of its own, say: that job's run fails). A disk with
    a little room left (a probe fits, a launch did not) is full too."""
    if exc.errno not in _DISK_ERRNOS:
        return False
    if exc.errno == errno.ENOSPC and (free := free_bytes(output_root)) is not None and free < DISK_FULL_BYTES:
        return True
    return write_refused(output_root) is not None


def room(free: int) -> str:
    """`free_bytes`' answer in words: "12 KiB free", "no file can be made there"."""
    if not free:
        return "no file can be made there"
    return f"{free / (1 << 20):.1f} MiB free" if free >= 1 << 20 else f"{free // 1024} KiB free"


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
