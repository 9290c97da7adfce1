"""A job's checkpoints as GET /checkpoints describes them (checkpoints.describe_checkpoints)."""

from __future__ import annotations

from pathlib import Path

from application.models.job_request import TrainingParams
from application.models.training_model import ExportInfo, ExportStatus, Job, JobStatus
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
    listed = describe_checkpoints(job, [])
    assert listed.exported == ten and [c.exported for c in listed.checkpoints] == [True, False]
    assert describe_checkpoints(job.model_copy(update={"exports": []}), []).exported is None
