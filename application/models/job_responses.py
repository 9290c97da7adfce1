"""What the job routes answer (the stored job is in training_model, the requests in job_request)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from application.models.artifact_model import NOT_READ
from application.models.training_model import (
    Event,
    ExportInfo,
    JobKind,
    JobStatus,
    LossPoint,
    PendingReason,
    PredictedDuration,
    Progress,
)


class CreateResponse(BaseModel):
    job_id: str
    status: JobStatus
    message: str
    queue_position: int | None = None
    estimated_wait_time: WaitEstimate | None = None
    pending_reason: PendingReason | None = None
    predicted_duration: PredictedDuration = Field(default_factory=PredictedDuration)
    gpu_ids: list[int] | None = Field(None, description="auto_start: the GPUs its run started on")


class WaitEstimate(BaseModel):
    seconds: float
    text: str


class ActionResponse(BaseModel):
    job_id: str
    status: JobStatus
    message: str
    resume_from: str | None = Field(None, description="pause/resume: the checkpoint the next run resumes from")
    resume_step: int | None = Field(None, description="pause/resume: the step of that checkpoint")
    lost_steps: int | None = Field(None, description="pause: steps trained since that checkpoint, to redo")
    queue_position: int | None = None
    estimated_wait_time: WaitEstimate | None = None
    pending_reason: PendingReason | None = None
    gpu_ids: list[int] | None = None
    export: ExportInfo | None = None


class StatusResponse(BaseModel):
    job_id: str
    status: JobStatus
    priority: int
    num_gpus: int = Field(description="the GPUs it asks for (0: CPU only)")
    gpu_ids: list[int]
    progress: Progress
    created_at: float
    started_at: float | None
    finished_at: float | None
    duration_seconds: float | None = Field(description="time spent running, over all its runs (see attempts)")
    error_message: str | None
    export: ExportInfo
    queue_position: int | None = None
    time_limit_seconds: int | None = None
    time_limit_left_seconds: float | None = Field(None, description="while it runs: how long its time limit leaves "
                                                  "this run before it is stopped (on the server's clock)")  # fmt: skip
    predicted_duration: PredictedDuration = Field(default_factory=PredictedDuration)
    pending_reason: PendingReason | None = Field(None, description="why a queued job waits")
    estimated_wait_time: WaitEstimate | None = None
    error_code: str | None = None


class CheckpointInfo(BaseModel):
    path: str
    step: int | None = None
    attempt: int | None = Field(None, description="the run that saved it")
    run_dir: str | None = None
    time: float | None = Field(None, description="when it was written (Unix seconds, from the file)")
    loss: float | None = Field(None, description="the training loss logged nearest before its step")
    size_bytes: int | None = None
    resume: bool = Field(False, description="the one the next resume would use")
    exported: bool = Field(False, description="a merge export of it completed (the job's exports list them)")
    complete: bool = Field(True, description="holds the LoRA adapter an export needs: false for a save a stop cut "
                                             "short, which no export takes")  # fmt: skip


class CheckpointList(BaseModel):
    job_id: str
    checkpoints: list[CheckpointInfo]
    total: int = Field(
        0, description="checkpoints on disk; `checkpoints` holds the newest `limit` of them, after the newest `offset`"
    )
    offset: int = 0
    resume_from: str | None = None
    exported: str | None = Field(None, description="the checkpoint the newest completed merge export is of")
    not_read: str | None = Field(None, description=NOT_READ)


class JobSummary(BaseModel):
    """A job as lists show it: kept as stored JSON (`lua.SUMMARY_FIELDS`), so a page decodes nothing."""

    job_id: str
    status: JobStatus
    priority: int
    owner: str | None = None
    model_path: str
    data_path: str
    output_dir: str
    num_gpus: int
    gpu_ids: list[int]
    created_at: float = Field(..., description="Unix seconds")
    queued_at: float | None = Field(None, description="Unix seconds")
    started_at: float | None = Field(None, description="Unix seconds")
    finished_at: float | None = Field(None, description="Unix seconds")
    progress: Progress
    export: ExportInfo
    error_message: str | None = None
    error_code: str | None = Field(None, description="which kind of failure (as a job's page says it; null in "
                                                     "entries written before the field)")  # fmt: skip
    predicted_duration: PredictedDuration | None = Field(
        None, description="how long the run should take, and from what (null in entries older than the field)"
    )
    kind: JobKind | None = Field(None, description="sft, pt, rlhf, or export (a quantized export's own job); null in "
                                               "entries written before the field")  # fmt: skip
    export_of: str | None = Field(None, description="kind export: the job whose model it exports (its exports list "
                                                    "says where the model went)")  # fmt: skip


class JobList(BaseModel):
    jobs: list[JobSummary]
    total: int
    offset: int
    limit: int
    next_offset: int | None
    next_cursor: str | None = Field(
        None,
        description="pass it as `cursor` for the next page: jobs deleted meanwhile shift no job out of it "
        "(null on the last page)",
    )


class ProgressResponse(BaseModel):
    job_id: str
    status: JobStatus
    progress: Progress
    history: list[LossPoint]
    stream_id: str | None = Field(None, description="the progress stream's id of the newest point of `history`: as "
                                  "Last-Event-ID, the stream goes on after it")  # fmt: skip
    checkpoints: list[str]
    last_checkpoint: str | None
    train_loss: float | None
    train_runtime: float | None


class LogsResponse(BaseModel):
    job_id: str
    log_file: str | None
    lines: list[str]
    count: int
    kind: Literal["train", "export"]


class EventList(BaseModel):
    job_id: str
    events: list[Event]
    next_after: str | None
    dropped_before: str | None = Field(
        None,
        description="set when events this page would have started with were dropped (EVENTS_MAX_PER_JOB keeps the "
        "newest): the oldest event kept, which the page starts at",
    )


class ErrorResponse(BaseModel):
    detail: str = Field(..., description="what went wrong and what to change")


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorResponse(BaseModel):
    detail: str = Field(..., description="every problem, one per field: what to change")
    errors: list[FieldError] = Field(default_factory=list, description="the same problems, one object per field")


class ExportList(BaseModel):
    job_id: str
    exports: list[ExportInfo] = Field(..., description="oldest first; the last is the current one")
