"""What a run leaves in its output folder, read back: checkpoints in the order a resume needs them."""

from __future__ import annotations

import os
from pathlib import Path

from application.services.run_outputs import find_checkpoints


def test_runs_are_ordered_by_swifts_number_not_by_when_their_folder_last_changed(tmp_path: Path) -> None:
    """An export of an old run's checkpoint writes checkpoint-N-merged into that run's folder: ordered by mtime,
    that run became the newest and a resume went back to its checkpoint, training the later steps again."""
    runs = {name: tmp_path / name for name in ("v0-20261201-220925", "v1-20261201-221410", "v9-a", "v10-b")}
    for run, steps in zip(runs.values(), ((4,), (8,), (12,), (16, 20)), strict=True):
        for step in steps:
            (run / f"checkpoint-{step}").mkdir(parents=True)
    (runs["v0-20261201-220925"] / "checkpoint-4-merged").mkdir()  # the export, made last
    later = os.stat(runs["v10-b"]).st_mtime + 60
    os.utime(runs["v0-20261201-220925"], (later, later))
    found = find_checkpoints(tmp_path)
    assert [Path(p).relative_to(tmp_path).as_posix() for p in found] == [
        "v0-20261201-220925/checkpoint-4", "v1-20261201-221410/checkpoint-8", "v9-a/checkpoint-12",
        "v10-b/checkpoint-16", "v10-b/checkpoint-20",
    ]  # fmt: skip
