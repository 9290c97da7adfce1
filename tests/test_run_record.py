"""What the end of a run writes to its job (run_record.record_end)."""

from __future__ import annotations

import pytest

from application.models.job_request import TrainingParams
from application.models.training_model import Job, JobStatus, Progress
from application.services.log_parser import RunFacts
from application.services.run_record import record_end


@pytest.mark.parametrize(("code", "interrupt", "status"), [
    (1, None, JobStatus.FAILED), (-15, "stop", JobStatus.STOPPED), (-15, "pause", JobStatus.PAUSED),
    (-15, "preempt", JobStatus.QUEUED), (0, None, JobStatus.COMPLETED),
])  # fmt: skip
def test_only_a_completed_run_keeps_swifts_estimate_of_the_time_left(code: int, interrupt: str | None,
                                                                     status: JobStatus) -> None:  # fmt: skip
    # A failed, stopped, paused or preempted job went on showing "33s" left of a run that was over.
    last = Progress(current_step=12, max_steps=40, remaining_time="33s", remaining_seconds=33.0, loss=0.5)
    job = Job(job_id="j", status=JobStatus.RUNNING, priority=5, owner=None, data_path="d", model_path="m",
              output_dir="/nowhere", output_dir_requested="j", num_gpus=1, training=TrainingParams(), created_at=0,
              updated_at=0, progress=last)  # fmt: skip
    for facts in (RunFacts(progress=last), RunFacts()):  # the run's own facts, or only what the job held
        end = record_end(job, code, facts, [], [], interrupt=interrupt, stop_outcome=None, override=None, now=1.0)
        assert end.status == status
        progress = end.fields.get("progress", job.progress)
        assert (progress.current_step, progress.loss) == (12, 0.5)
        kept = status == JobStatus.COMPLETED
        assert (progress.remaining_time == "33s", progress.remaining_seconds == 33.0) == (kept, kept)
