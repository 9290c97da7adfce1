"""Which filesystem a path lies on: the deepest mount point above it, for paths that do not exist yet too."""

from __future__ import annotations

from pathlib import Path

from application.utils.filesystems import filesystem_type, on_local_disk


def test_the_deepest_mount_point_decides_and_unknown_types_count_as_remote() -> None:
    assert filesystem_type(Path("/")) != ""
    assert filesystem_type(Path("/proc/self/no-such-file")) == "proc"
    assert not on_local_disk(Path("/proc/swift-api-output"))  # procfs is on no allow-list: not local
