"""What the queue, GPU, system and health routes return (the job routes' models are in training_model)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from application.models.job_responses import WaitEstimate
from application.models.training_model import JobStatus, PendingReason, PredictedDuration

# ---- the queue -------------------------------------------------------------------------------------------


class QueueEntry(BaseModel):
    position: int = Field(..., description="1 = next")
    job_id: str
    owner: str | None = None
    mine: bool = Field(..., description="the caller's own job (others' are shown without their paths)")
    priority: int
    num_gpus: int
    gpu_ids: list[int] | None = None
    min_gpu_memory_gb: float | None = None
    submitted_at: float = Field(..., description="Unix seconds")
    waited_seconds: float
    estimated_wait_time: WaitEstimate | None = None
    predicted_duration_seconds: float | None = Field(None, description="what the queue plans it to run (see job)")
    pending_reason: PendingReason | None = None


class QueueSummary(BaseModel):
    length: int
    offset: int
    limit: int
    total_gpus: int
    free_gpus: int
    running_jobs: int
    policy: str
    processor_running: bool
    starts_held: str | None = Field(
        None,
        description="why no run starts for a few seconds, though GPUs look free (after a Redis restart, runs "
        "Redis may have forgotten must end first; OUTPUT_ROOT's disk full or read-only), and until when",
    )
    gpu_error: str | None = None


class QueueOverview(BaseModel):
    entries: list[QueueEntry]
    summary: QueueSummary


class QueueJobStatus(BaseModel):
    job_id: str
    queued: bool
    status: JobStatus
    queue_position: int | None = None
    jobs_ahead: int | None = None
    priority: int | None = None
    num_gpus: int | None = None
    waited_seconds: float | None = None
    estimated_wait_time: WaitEstimate | None = None
    pending_reason: PendingReason | None = None
    predicted_duration: PredictedDuration | None = None
    message: str | None = None


class PassResult(BaseModel):
    started: list[str] = Field(..., description="jobs this pass started")
    queue_length: int
    message: str


class QueueRemoval(BaseModel):
    job_id: str
    status: JobStatus
    message: str


class PredictionError(BaseModel):
    """actual / predicted duration over the last finished jobs that had a prediction (1 = exact)."""

    count: int
    median: float | None = None
    p90: float | None = None


class ProcessorStatus(BaseModel):
    running: bool = Field(..., description="switched on, and a scheduler leads")
    enabled: bool = Field(..., description="the switch (POST /queue/processor/start|stop)")
    since: float | None = Field(None, description="when the switch last changed (Unix seconds)")
    leader: str | None = Field(None, description="the leading scheduler (host:pid:start)")
    passes: int
    jobs_started: int
    last_pass_at: float | None = None
    last_pass_ms: float | None = None
    last_started: list[str] = Field(default_factory=list)
    last_error: str | None = None
    last_error_at: float | None = None
    poll_interval_seconds: float
    policy: str
    starvation_seconds: float = Field(..., description="QUEUE_STARVATION_SECONDS")
    prediction_error: PredictionError
    message: str | None = None


# ---- GPUs, system, health ----------------------------------------------------------------------------------


class GpuProcessInfo(BaseModel):
    pid: int
    used_memory_mb: float | None = None
    name: str | None = None


class GpuInfoOut(BaseModel):
    index: int
    uuid: str
    name: str
    memory_total_mb: float = Field(..., description="MiB, as nvidia-smi prints it")
    memory_used_mb: float
    memory_free_mb: float
    utilization: float | None = Field(None, description="percent")
    memory_utilization: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    processes: list[GpuProcessInfo] = Field(default_factory=list)
    job_id: str | None = Field(None, description="the job of ours that holds it")
    error: str | None = Field(None, description="why this is not a live reading: it counts as busy meanwhile")


class GpuSummary(BaseModel):
    backend: str
    count: int
    memory_total_gb: float
    memory_used_gb: float
    memory_free_gb: float
    mean_utilization: float | None = None
    driver_version: str | None = None
    error: str | None = None


class HeldGpu(BaseModel):
    index: int
    job_id: str


class GpuList(BaseModel):
    backend: str
    driver_version: str | None = None
    error: str | None = None
    taken_at: float | None = Field(None, description="when the scheduler read them (Unix seconds)")
    gpus: list[GpuInfoOut]
    summary: GpuSummary
    missing: list[HeldGpu] = Field(
        default_factory=list,
        description="GPUs a job still holds that the reading does not show: removed, or hidden since the job "
        "started (CUDA_VISIBLE_DEVICES, SIMULATED_GPUS); they are free again when that job ends",
    )


class RedisHealth(BaseModel):
    ok: bool
    latency_ms: float | None = None
    embedded: bool = False
    redis_version: str | None = None
    uptime_in_seconds: str | None = None
    error: str | None = None


class SchedulerHealth(BaseModel):
    ok: bool
    leader: str | None = None
    gpu_reading_age_seconds: float | None = None
    error: str | None = None
    starts_held: str | None = Field(None, description="why no run starts now (OUTPUT_ROOT's disk full or read-only, "
                                    "a Redis restart): the status is then degraded")  # fmt: skip


class SwiftHealth(BaseModel):
    ok: bool | None = None
    version: str | None = None
    version_source: str | None = None
    bin: str | None = None
    probed: bool | None = None
    detail: str | None = None


class GpuHealth(BaseModel):
    backend: str
    count: int
    error: str | None = None
    never_free: str | None = Field(None, description="why no GPU can ever take a job (a setting): then degraded")


class Health(BaseModel):
    status: Literal["healthy", "degraded", "unhealthy"]
    redis: RedisHealth
    gpu: GpuHealth | None = None
    scheduler: SchedulerHealth | None = None
    swift: SwiftHealth | None = None
    version: str | None = Field(None, description="null for a caller without a key where keys are configured")
    detail: str | None = None


class SystemStatus(BaseModel):
    cpu: dict[str, float | int | None]
    memory: dict[str, float]
    disk: dict[str, float | str]
    load: dict[str, float]
    gpus: GpuSummary
    jobs: dict[str, int] | None = None
    queue_length: int | None = None
    redis: RedisHealth
    scheduler: SchedulerHealth | None = None
    queue_processor: dict[str, bool | str]
    swift: SwiftHealth | None = None
    version: str
    uptime_seconds: float = Field(..., description="of this API worker")


class WebhookKey(BaseModel):
    """What verifies the notifications to the own `webhook_url` of your jobs."""

    owner: str | None = Field(description="whose jobs' notifications it signs (null: no API_KEYS, one for all)")
    signing_key: str = Field(description="the HMAC-SHA256 key: X-Swift-Api-Signature is sha256=<hex HMAC of the "
                             "body with this key>; the operator's WEBHOOK_URLS are signed with "
                             "WEBHOOK_SECRET")  # fmt: skip
    header: str = "X-Swift-Api-Signature"
    generation: int = Field(0, description="how many times it was rotated (POST /webhooks/signing-key/rotate)")
