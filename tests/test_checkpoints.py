"""A job's checkpoints as GET /checkpoints describes them (checkpoints.describe_checkpoints)."""

from __future__ import annotations

from pathlib import Path

import pytest

from application.models.job_request import TrainingParams
from application.models.training_model import ExportInfo, ExportStatus, Job, JobStatus
from application.services import clock
from application.services.checkpoints import describe_checkpoints


def test_the_exported_checkpoint_is_the_newest_completed_merges_not_a_failed_ones(tmp_path: Path) -> None:
    # `exported` named the current export's checkpoint, also when that export had failed.
    run = tmp_path / "v0-1"
    ten, twenty = str(run / "checkpoint-10"), str(run / "checkpoint-20")
    for path in (ten, twenty):
        Path(path).mkdir(parents=True)
    merged = ExportInfo(status=ExportStatus.COMPLETED, export_id="a", checkpoint=ten, finished_at=5.0)
    failed = ExportInfo(status=ExportStatus.FAILED, export_id="b", checkpoint=twenty, finished_at=9.0)
    job = Job(job_id="j", status=JobStatus.FAILED, priority=5, owner=None, data_path="d", model_path="m",
              output_dir=str(tmp_path), output_dir_requested="j", num_gpus=1, training=TrainingParams(), created_at=0,
              updated_at=0, run_dir=str(run), export=failed, exports=[merged])  # fmt: skip
    listed = describe_checkpoints(job, tmp_path.parent, [])
    assert listed.exported == ten and [c.exported for c in listed.checkpoints] == [True, False]
    assert describe_checkpoints(job.model_copy(update={"exports": []}), tmp_path.parent, []).exported is None


def _job(output_dir: Path, run_dir: Path | None = None) -> Job:
    return Job(job_id="j", status=JobStatus.FAILED, priority=5, owner=None, data_path="d", model_path="m",
               output_dir=str(output_dir), output_dir_requested="j", num_gpus=1, training=TrainingParams(),
               created_at=0, updated_at=0, run_dir=str(run_dir) if run_dir else None)  # fmt: skip


def _checkpoint(run: Path, step: int) -> None:
    (run / f"checkpoint-{step}").mkdir(parents=True)
    (run / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")


def test_a_job_folder_a_symlink_now_leads_elsewhere_lists_no_checkpoints(tmp_path: Path) -> None:
    # Its files are not listed (artifacts refuse such a folder): its checkpoints were, with their sizes, and one
    # of another folder's was offered as the point to resume from.
    root = tmp_path / "out"
    _checkpoint(root / "others" / "v0-20260101-000000", 7)
    (root / "mine").symlink_to(root / "others")
    listed = describe_checkpoints(_job(root / "mine"), root, [])
    assert listed.checkpoints == [] and listed.total == 0 and listed.resume_from is None


def test_a_run_folder_that_is_a_symlink_out_of_the_job_folder_holds_none_of_its_checkpoints(tmp_path: Path) -> None:
    root = tmp_path / "out"
    _checkpoint(tmp_path / "outside", 3)
    job_dir = root / "j"
    _checkpoint(job_dir / "v0-20260101-000000", 5)
    linked = job_dir / "v1-20260101-000001"
    linked.symlink_to(tmp_path / "outside")
    ran = _job(job_dir).model_copy(update={"started_at": 1.0})
    assert describe_checkpoints(ran, root, []).total == 1  # (a record that ran, of a version that named no folder)
    for job in (ran, _job(job_dir, run_dir=linked)):  # (its run folder unknown, or named)
        listed = describe_checkpoints(job, root, [])
        assert all("outside" not in c.path and not c.path.startswith(str(linked)) for c in listed.checkpoints)
        assert listed.resume_from is None or listed.resume_from.startswith(str(job_dir / "v0-"))


def test_a_checkpoints_time_is_on_the_shared_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A job's times are Redis's; a checkpoint's was its folder's mtime on this host's clock, so with Redis 90 s
    # ahead the checkpoints showed saved before the run began (hunt BH).
    run = tmp_path / "v0-1"
    _checkpoint(run, 5)
    real_now = clock.now
    monkeypatch.setattr(clock._clock, "now", lambda: real_now() + 90)
    listed = describe_checkpoints(_job(tmp_path, run), tmp_path.parent, [])
    saved = (run / "checkpoint-5").stat().st_mtime
    assert listed.checkpoints[0].time is not None and abs(listed.checkpoints[0].time - (saved + 90)) < 1


def test_a_job_that_never_ran_has_none_of_the_checkpoints_left_in_its_folder(tmp_path: Path) -> None:
    # A job created again in a deleted job's folder listed that job's checkpoints as its own (hunt BR).
    root = tmp_path / "out"
    _checkpoint(root / "j" / "v0-20260101-000000", 5)
    pending = _job(root / "j").model_copy(update={"status": JobStatus.PENDING})
    listed = describe_checkpoints(pending, root, [])
    assert listed.checkpoints == [] and listed.resume_from is None


def test_a_checkpoint_whose_adapter_weights_are_gone_is_not_resumed_from(tmp_path: Path) -> None:
    # Listed complete and resumed from: swift then read the folder as a hub id and failed (hunt CY).
    from application.services.checkpoints import first_resumable

    def checkpoint(name: str, *files: str) -> str:
        folder = tmp_path / name
        folder.mkdir()
        for f in files:
            (folder / f).write_text("{}")
        return str(folder)

    whole = checkpoint("checkpoint-10", "trainer_state.json", "adapter_config.json", "adapter_model.safetensors")
    older = checkpoint("checkpoint-5", "trainer_state.json", "adapter_config.json", "adapter_model.bin")
    gutted = checkpoint("checkpoint-15", "trainer_state.json", "adapter_config.json")
    full = checkpoint("checkpoint-20", "trainer_state.json", "model.safetensors")  # (full training: no adapter)
    assert first_resumable([gutted, whole]) == whole
    assert first_resumable([gutted, older]) == older
    assert first_resumable([full, whole]) == full
    assert first_resumable([gutted]) is None
