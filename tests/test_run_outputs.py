"""What a run leaves in its output folder, read back: checkpoints in the order a resume needs them."""

from __future__ import annotations

import os
from pathlib import Path

from application.services.run_outputs import find_checkpoints, job_checkpoints


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


def test_a_jobs_checkpoints_are_those_of_its_own_runs_in_swifts_order(tmp_path: Path) -> None:
    # Another job's runs in the same folder (one of them with thousands of files) are neither listed nor read.
    for name, steps in (("v0-old", (2,)), ("v1-mine", (4, 8)), ("v2-other", (6,)), ("v10-mine", (12,))):
        for step in steps:
            (tmp_path / name / f"checkpoint-{step}").mkdir(parents=True)
    (tmp_path / "v1-mine" / "checkpoint-8-merged").mkdir()
    (tmp_path / "v10-mine" / "checkpoint-99").symlink_to(tmp_path / "v0-old" / "checkpoint-2")
    for i in range(2000):
        (tmp_path / "v2-other" / f"f{i}").touch()
    mine = [str(tmp_path / "v10-mine"), None, str(tmp_path / "v1-mine") + "/"]
    found = job_checkpoints(tmp_path, mine)
    assert [Path(p).relative_to(tmp_path).as_posix() for p in found] == [
        "v1-mine/checkpoint-4", "v1-mine/checkpoint-8", "v10-mine/checkpoint-12"]  # fmt: skip
    # No run known yet: every checkpoint of the folder, as find_checkpoints.
    assert job_checkpoints(tmp_path, [None]) == find_checkpoints(tmp_path)
    # Given a run folder as the output folder, the run is that folder itself.
    assert job_checkpoints(tmp_path / "v1-mine", [str(tmp_path / "v1-mine")]) == found[:2]
