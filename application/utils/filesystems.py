"""Which filesystem a path lives on: a metadata lookup on a local disk takes microseconds, one on a network
filesystem (NFS, SMB, FUSE mounts...) can hang as long as its server does."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import psutil

# An allow-list: a filesystem not named here counts as remote, so the cautious path is the default.
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "tmpfs", "ramfs", "overlay",
                               "jfs", "reiserfs", "bcachefs"})  # fmt: skip


def filesystem_type(path: Path) -> str:
    """The type of the filesystem `path` (resolved, existing or not) lies on: its deepest mount point's."""
    real = os.path.realpath(path)
    best, fstype = "", ""
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):  # the same point mounted again: the last one shows
            best, fstype = mount, part.fstype
    return fstype


@lru_cache(maxsize=16)
def on_local_disk(path: Path) -> bool:
    """Read once per process: the roots are settings, and mounts under them rarely change while it runs."""
    return filesystem_type(path) in LOCAL_FILESYSTEMS
