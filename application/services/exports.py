"""What an export of a job will run: `swift export --adapters <checkpoint> --merge_lora true`.

Prepared by whoever asks for it (an API worker, or the runner after a successful run) and carried out by a
runner. Synchronous: it looks at the disk (which checkpoint exists, whether the merged folder does).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from application.config import Settings
from application.exceptions import Conflict
from application.models.training_model import ExportInfo, ExportStatus, Job, JobStatus
from application.services.run_outputs import find_checkpoints
from application.services.swift_command import build_export_command

# A paused job's checkpoint can be exported too (the merge only reads it).
ENDED_WITH_SWIFT = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.PAUSED)


def export_log(job: Job) -> Path:
    return Path(job.output_dir) / "logs" / f"{job.job_id}.export.log"


def prepare_export(job: Job, settings: Settings, *, auto: bool, checkpoint: str | None = None) -> ExportInfo:
    """The export to run for `job`, or Conflict saying why there is none."""
    if job.status not in ENDED_WITH_SWIFT:
        raise Conflict(
            f"job '{job.job_id}' is {job.status.value}: export needs a finished training run "
            "(completed, stopped or failed with a checkpoint)"
        )
    if job.export.status == ExportStatus.RUNNING:
        raise Conflict(f"an export of job '{job.job_id}' is already running: wait for it to end")
    if job.training.train_type == "full":
        raise Conflict(f"job '{job.job_id}' trained the full model: there is no LoRA adapter to merge")
    if checkpoint is None:
        if job.last_checkpoint and Path(job.last_checkpoint).is_dir():
            checkpoint = job.last_checkpoint
        else:
            on_disk = find_checkpoints(Path(job.output_dir))
            checkpoint = on_disk[-1] if on_disk else None
    if checkpoint is None or not Path(checkpoint).is_dir():
        raise Conflict(f"job '{job.job_id}' has no checkpoint yet: nothing to export")
    exist_ok = Path(f"{checkpoint}-merged").exists()  # a second export of one checkpoint needs --exist_ok true
    return ExportInfo(
        status=ExportStatus.RUNNING, export_id=uuid.uuid4().hex, auto=auto, checkpoint=checkpoint,
        command=build_export_command(settings.SWIFT_BIN, checkpoint, exist_ok=exist_ok),
        log_file=str(export_log(job)), started_at=time.time(),
    )  # fmt: skip
