"""The training job as stored: its statuses and parts (progress, attempts, exports); the requests that create
and change it live in job_request.py."""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, Field

from application.models.job_request import TrainingParams

# A job's kind: what a create asks for, or "export" for a quantized export that runs on a GPU of its own.
JobKind = Literal["sft", "pt", "rlhf", "export"]


class JobStatus(str, Enum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELLED})

# The only legal moves; `transition` in the store refuses everything else. A running job goes back to the queue
# when it is preempted or retried, and rests as paused when paused.
ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.PENDING: frozenset({JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    # (STOPPED: a job that ran before, waiting to resume, keeps what it trained: POST .../resume goes on;
    # PAUSED: a pause asked as its last run went back to the queue)
    JobStatus.QUEUED: frozenset(
        {JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.PAUSED}
    ),
    JobStatus.RUNNING: frozenset(
        {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.PAUSED, JobStatus.QUEUED}
    ),
    # (CANCELLED: stopped with no checkpoint, it could never be resumed)
    JobStatus.PAUSED: frozenset({JobStatus.QUEUED, JobStatus.STOPPED, JobStatus.CANCELLED}),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.STOPPED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}

# The one way out of a terminal state: POST .../resume of a stopped or failed run that left a checkpoint. The
# store allows it only when asked to re-open (`transition(..., reopen=True)`), which also claims the output
# folder again; nothing else ever leaves a terminal state.
REOPENABLE: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.FAILED: frozenset({JobStatus.QUEUED}),
    JobStatus.STOPPED: frozenset({JobStatus.QUEUED}),
}


class ExportStatus(str, Enum):
    NONE = "none"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"


class Progress(BaseModel):
    current_step: int | None = None
    max_steps: int | None = None
    percentage: float | None = None
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    token_acc: float | None = None
    elapsed_time: str | None = None
    remaining_time: str | None = None
    remaining_seconds: float | None = None
    train_speed: float | None = Field(None, description="seconds per step")
    memory_gib: float | None = None
    updated_at: float | None = None


class PredictedDuration(BaseModel):
    """How long the server expects a run to take, and where that comes from (best first): the job's
    time_limit, its plan (steps x the measured speed of past runs of the model), the history of similar
    jobs, or, once running, swift's own remaining time (progress)."""

    seconds: float | None = None
    source: Literal["time_limit", "plan", "history", "progress"] | None = None


PendingCode = Literal["priority", "resources", "reservation", "preemption", "outside_processes", "gpu_unreadable",
                      "owner_limit", "never", "processor_stopped", "retry_backoff"]  # fmt: skip


class PendingReason(BaseModel):
    """Why a queued job waits (Slurm's REASON column)."""

    code: PendingCode = Field(
        ...,
        description="priority: jobs ahead of it go first; resources: not enough free GPUs; reservation: the free "
        "GPUs are held for job_id until about starts_at; preemption: lower-priority runs (job_id the first) make way "
        "for it from about starts_at (PREEMPTION); outside_processes: GPUs it needs are busy with processes "
        "the server did not start; gpu_unreadable: GPUs it needs could not be read (see GET /gpus); owner_limit: "
        "its owner is at MAX_GPUS_PER_OWNER or MAX_RUNNING_PER_OWNER, with its jobs ahead; never: the request "
        "cannot be met on these GPUs; processor_stopped: no pass starts jobs now: the queue processor is off, no "
        "scheduler runs, or starts are held for a few seconds after a Redis restart; retry_backoff: a retried run "
        "waits until starts_at before it may start (RETRY_BACKOFF_SECONDS)",
    )
    message: str
    job_id: str | None = Field(None, description="reservation: the job the GPUs are held for; preemption: the "
                               "first run that makes way")  # fmt: skip
    starts_at: float | None = Field(None, description="reservation: when that job should start; preemption: when "
                                    "the runs are asked to; retry_backoff: when it may start again "
                                    "(Unix seconds)")  # fmt: skip


class Attempt(BaseModel):
    """One run of a job: a job that is paused, preempted or retried and resumed has several."""

    number: int = Field(..., description="1 for the first run")
    run_id: str
    started_at: float
    finished_at: float | None = None
    outcome: str | None = Field(
        None, description="completed, failed, stopped, paused, preempted (back to the queue) or retried"
    )
    error_code: str | None = None
    error_message: str | None = None
    preempted_for: str | None = Field(
        None, description="what a preempted run made way for: a job, or the shutdown or restart of its host"
    )
    run_dir: str | None = Field(None, description="swift's vN-... folder of this run")
    log_file: str | None = Field(None, description="this run's swift output (GET .../logs?attempt=N)")
    resumed_from: str | None = Field(None, description="the checkpoint this run resumed from")
    first_step: int | None = Field(None, description="the step it started after (the checkpoint's)")
    last_step: int | None = None
    gpu_ids: list[int] = Field(default_factory=list)


class RunnerInfo(BaseModel):
    """The runner process that owns a run (or an export): where it is and how to tell it is still the same one."""

    host: str
    pid: int | None = None
    start_time: float | None = Field(None, description="process start time (Unix seconds)")
    stamp: str | None = Field(None, description="boot id / start tick: the process exactly, against reused pids")
    launched_at: float = Field(..., description="when the scheduler launched it (Unix seconds)")
    ready_at: float | None = Field(None, description="when the runner had started and read its job (Unix seconds)")

    def is_process(self, other: RunnerInfo | None) -> bool:
        """The same process as `other`, however each was recorded (the scheduler's record of a launch and the
        runner's own differ in their times)."""
        return other is not None and (self.host, self.pid, self.stamp) == (other.host, other.pid, other.stamp)


class ExportInfo(BaseModel):
    status: ExportStatus = ExportStatus.NONE
    export_id: str | None = Field(None, description="one export; its runner writes only under it")
    auto: bool = False
    checkpoint: str | None = None
    merge_lora: bool = True
    quant_bits: int | None = None
    quant_method: str | None = None
    output_dir: str | None = Field(None, description="where swift export writes (default <checkpoint>-merged)")
    job_id: str | None = Field(None, description="a quantized export runs as a job of its own on a GPU: that job")
    job_status: str | None = Field(None, description="that job's status: a quantized export stays running while "
                                                     "its job waits (queued, paused) or runs")  # fmt: skip
    path: str | None = None
    error: str | None = None
    pid: int | None = None
    process_start_time: float | None = None
    process_stamp: str | None = None
    command: list[str] | None = None
    log_file: str | None = None
    exit_code: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    runner: RunnerInfo | None = None
    host_restarts: int = Field(0, description="how many of its runs were cut short by their host going down")


class Job(BaseModel):
    """A job as stored. Every top-level field is one field of the job's Redis hash."""

    job_id: str
    status: JobStatus
    priority: int
    owner: str | None = Field(None, description="the name of the API key that created it (None: no keys)")
    owner_checked: bool = Field(False, description="its create kept its paths out of other owners' files (a user "
                                "key): each run checks its folders' links again the same way")  # fmt: skip
    data_path: str
    model_path: str
    output_dir: str
    output_dir_requested: str
    dataset_rows: int | None = Field(None, description="rows of the local data set, counted at create")
    num_gpus: int
    gpu_ids_requested: list[int] | None = None
    min_gpu_memory_gb: float | None = None
    kind: JobKind = "sft"
    rlhf_type: str | None = None
    export_of: str | None = Field(None, description="kind export: the job whose checkpoint it exports")
    export_argv: list[str] | None = Field(None, description="kind export: the `swift export` it runs")
    training: TrainingParams
    time_limit_seconds: int | None = Field(None, description="the run is stopped past this (failed, time_limit)")
    predicted_duration: PredictedDuration = Field(default_factory=PredictedDuration)
    queued_prediction: PredictedDuration | None = Field(
        None, description="the prediction the queue planned with while the job waited (for the prediction error)"
    )
    gpu_ids: list[int] = Field(default_factory=list, description="GPUs held while running")
    created_at: float
    updated_at: float
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    pid: int | None = Field(None, description="swift's launcher; it leads the process group of the run")
    process_start_time: float | None = None
    process_stamp: str | None = Field(None, description="boot id / start tick of `pid`, against reused pids")
    runner: RunnerInfo | None = Field(None, description="the runner process that owns the current run")
    scheduled_by: str | None = Field(None, description="the scheduler that started the current run")
    command: list[str] | None = None
    command_line: str | None = None
    env: dict[str, str] | None = Field(None, description="environment variables set for swift")
    swift_version: str | None = None
    log_file: str | None = None
    log_offset: int = Field(0, description="bytes of the log already parsed")
    stop_requested: bool = False
    pause_requested: bool = False
    preempt_for: str | None = Field(None, description="the job this run is being preempted for")
    stop_outcome: str | None = Field(None, description="how a stop ended the run: terminated (SIGTERM) or killed")
    max_retries: int = Field(0, description="automatic retries after a retryable failure")
    webhook_url: str | None = Field(None, description="this job's own notification URL")
    retries: int = Field(0, description="automatic retries used so far")
    retry_at: float | None = Field(None, description="a retried job waits in the queue until then before it may "
                                   "start again (RETRY_BACKOFF_SECONDS, doubled at each retry)")  # fmt: skip
    resume_from: str | None = Field(None, description="the checkpoint the next run resumes from")
    attempts: list[Attempt] = Field(default_factory=list, description="one per run")
    last_checkpoint_at: float | None = Field(None, description="when the current run last saved a checkpoint")
    export_stop_requested: bool = False
    run_dir: str | None = None
    exit_code: int | None = None
    error_message: str | None = None
    error_code: str | None = Field(
        None,
        description="why it failed: exit_code, disk_full, signal, launch, time_limit, runner_lost, lost, "
        "host_restarts, output_dir, input_path, unknown_run (README: Running swift, following it, restarts)",
    )
    log_tail: list[str] | None = None
    progress: Progress = Field(default_factory=Progress)
    checkpoints: list[str] = Field(default_factory=list)
    last_checkpoint: str | None = None
    best_checkpoint: str | None = None
    train_loss: float | None = None
    train_runtime: float | None = None
    export: ExportInfo = Field(default_factory=ExportInfo, description="the current (latest) export")
    exports: list[ExportInfo] = Field(default_factory=list, description="the exports before the current one")
    run_id: str | None = Field(None, description="one swift run of this job; its runner writes only under it")

    def duration_seconds(self, now: float) -> float | None:
        """Time spent running, over all its runs: not a pause, nor a wait in the queue between runs (it was the
        last run's alone after a resume, and everything since the first after a stop in the queue)."""
        if self.attempts:
            running = self.status == JobStatus.RUNNING
            last = len(self.attempts) - 1
            # (never below 0: a run's start and "now" come from two hosts' readings of one clock)
            return sum(
                max(0.0, (a.finished_at if a.finished_at is not None else now if running and i == last else
                          self.finished_at or a.started_at) - a.started_at)
                for i, a in enumerate(self.attempts)
            )  # fmt: skip
        if self.started_at is None:
            return None
        return max(0.0, (self.finished_at or now) - self.started_at)


class LossPoint(BaseModel):
    step: int
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    epoch: float | None = None
    time: float | None = None
    metrics: dict[str, float] | None = Field(
        None, description="every other number swift logged at this step, by its name: rlhf's rewards/margins, "
        "rewards/accuracies, logps/*, logits/*, KTO's kl, ORPO's nll_loss, token_acc, eval_* (up to 32)",
    )  # fmt: skip


class Event(BaseModel):
    id: str
    time: float
    type: str
    message: str
    actor: str | None = Field(None, description="who caused it: an API key's name, 'anonymous' or 'scheduler'")
    data: dict[str, Any] = Field(default_factory=dict)
