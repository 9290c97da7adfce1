"""The training job: its statuses, the request that creates it, and what the API returns."""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from application.services.predictions import parse_time_limit

JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
TrainingKind = Literal["sft", "pt", "rlhf"]
# A job's kind: what a create asks for, or "export" for a quantized export that runs on a GPU of its own.
JobKind = Literal["sft", "pt", "rlhf", "export"]
# Other names of TrainingParams fields and of ms-swift arguments, accepted in `training` and stored under the
# second name. ms-swift 2.x's names are mapped, never passed on: 3.x and 4.x exit with `remaining_argv` on them.
ALIASES = {
    "num_train_epochs": "num_epochs",
    "per_device_train_batch_size": "batch_size",
    "tuner_type": "train_type",
    "lora_target_modules": "target_modules",
    "sft_type": "train_type",
}
JOB_ID_HELP = "1-128 characters: letters, digits, '_', '.', '-', starting with a letter or digit"


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
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.PAUSED, JobStatus.QUEUED}
    ),
    JobStatus.PAUSED: frozenset({JobStatus.QUEUED, JobStatus.STOPPED}),
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


def _whole(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _bare(annotation: Any) -> Any:
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def _takes_int(annotation: Any) -> bool:
    """int, int | None, list[int] | None (constraints aside)."""
    for a in (annotation, *get_args(annotation)):
        a = _bare(a)
        if a is int or (get_origin(a) is list and _bare(get_args(a)[0]) is int):
            return True
    return False


class _Strict(BaseModel):
    # strict: "5" or true is not a priority; a request says what it means.
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data: Any) -> Any:
        # JSON Schema's "integer" includes 7.0, so the published schema must not be stricter than this.
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, info in cls.model_fields.items():
            value = out.get(name)
            if value is None or not _takes_int(info.annotation):
                continue
            out[name] = [_whole(v) for v in value] if isinstance(value, list) else _whole(value)
        return out


class TrainingParams(_Strict):
    """Overrides of the spec's fixed Swift parameters; the defaults are the spec's values.

    Any other argument of the `swift sft|pt|rlhf` that will run the job may be set here too, by its ms-swift
    name (`target_modules`, `deepspeed`, `lr_scheduler_type`, `report_to`, `quant_bits`, ...): it is checked
    against the installed ms-swift's own argument list when the job is created (services/swift_arguments.py).
    The swift names of the fields below (`num_train_epochs`, `per_device_train_batch_size`, `tuner_type`) and
    ms-swift 2.x's `lora_target_modules` are accepted as aliases."""

    model_config = ConfigDict(extra="allow", strict=True)

    num_epochs: int = Field(1, ge=1, le=1000, description="--num_train_epochs")
    batch_size: int = Field(1, ge=1, le=4096, description="--per_device_train_batch_size")
    learning_rate: float = Field(1e-4, gt=0, le=1)
    vit_lr: float = Field(1e-5, gt=0, le=1, description="multimodal models only")
    aligner_lr: float = Field(1e-5, gt=0, le=1, description="multimodal models only")
    lora_rank: int = Field(16, ge=1, le=1024)
    lora_alpha: int = Field(32, ge=1, le=4096)
    gradient_accumulation_steps: int = Field(4, ge=1, le=4096)
    eval_steps: int = Field(100, ge=1)
    save_steps: int = Field(100, ge=1)
    save_total_limit: int = Field(2, ge=1, le=1000)
    logging_steps: int = Field(5, ge=1)
    max_length: int = Field(8192, ge=16, le=1_048_576)
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    dataloader_num_workers: int = Field(4, ge=0, le=128)
    dataset_num_proc: int = Field(4, ge=1, le=256)
    save_only_model: bool = True
    train_type: Literal["lora", "full", "longlora", "adalora", "llamapro", "vera", "boft", "fourierft", "reft"] = "lora"
    torch_dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None, description="default: bfloat16 on GPUs, float32 for a CPU-only job (num_gpus 0)"
    )
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    split_dataset_ratio: float | None = Field(None, ge=0, lt=1)
    model_type: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="needed by custom models")
    template: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="needed by custom models")
    multimodal: bool | None = Field(
        None, description="pass --vit_lr/--aligner_lr; default: guessed from the model (VL/vision config)"
    )

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not any(k in ALIASES for k in data):
            return data
        out = dict(data)
        for alias, name in ALIASES.items():
            if alias not in out:
                continue
            value = out.pop(alias)
            if name in out and out[name] != value:
                raise ValueError(f"training.{alias} and training.{name} are the same argument: set one of them")
            out[name] = value
        return out

    @property
    def extra_arguments(self) -> dict[str, Any]:
        """The ms-swift arguments beyond the named fields, as checked and converted at create."""
        return dict(self.model_extra or {})


class JobCreate(_Strict):
    data_path: str = Field(
        ...,
        min_length=1,
        max_length=4096,
        examples=["AI-ModelScope/coco#20000"],
        description="a hub data set id (namespace/name, optionally #N rows), or a .jsonl/.json/.csv file inside "
        "DATA_ROOTS (absolute, ./relative to the server, or relative to a data root)",
    )
    model_path: str = Field(
        ...,
        min_length=1,
        max_length=4096,
        examples=["Qwen/Qwen2.5-VL-7B-Instruct"],
        description="a hub model id (namespace/name), or a model folder inside MODEL_ROOTS or OUTPUT_ROOT",
    )
    output_dir: str = Field(
        ..., min_length=1, max_length=4096, examples=["training_001"], description="a folder under OUTPUT_ROOT"
    )
    priority: int = Field(5, ge=0, le=10, description="0-10, 10 runs first")
    job_id: str | None = Field(None, description=JOB_ID_HELP)
    num_gpus: int = Field(1, ge=0, le=64, description="0 = CPU-only run")
    gpu_ids: list[Annotated[int, Field(ge=0, le=1023)]] | None = Field(
        None,
        min_length=1,
        max_length=64,
        json_schema_extra={"uniqueItems": True},
        description="explicit GPU indices (default: chosen automatically)",
    )
    min_gpu_memory_gb: float | None = Field(None, gt=0, le=4096)
    auto_start: bool = Field(False, description="start at once when GPUs are free (else the job waits as pending)")
    webhook_url: str | None = Field(
        None,
        max_length=2048,
        pattern=r"^https?://[^\s/?#]+[^\s]*$",
        examples=["https://ci.example.com/hooks/swift"],
        description="also POST this job's notifications here (ended, paused, preempted, export done)",
    )
    max_retries: int = Field(
        0,
        ge=0,
        le=10,
        description="retry a run that was killed by a signal or lost its runner or host, from its "
        "last checkpoint, up to this many times (a failure that would repeat is never retried)",
    )
    time_limit: int | str | None = Field(
        None,
        examples=["2h"],
        description="stop the run when it has run this long (it then fails with error_code 'time_limit'): seconds,"
        " or text such as '90m', '2h', '1h30m', '1d'; 1 s to 30 days. The queue plans with it, like Slurm's",
    )
    kind: TrainingKind = Field(
        "sft",
        description="sft: `swift sft`; pt: `swift pt` (pre-training on text); "
        "rlhf: `swift rlhf --rlhf_type <rlhf_type>` (preference or RL training)",
    )
    rlhf_type: str | None = Field(None, pattern=r"^[a-z0-9_]{1,32}$", examples=["dpo"],
                                  description="with kind rlhf: dpo (default), kto, orpo, simpo, cpo, rm, ppo, grpo, "
                                  "gkd (whatever the installed ms-swift offers)")  # fmt: skip
    training: TrainingParams = Field(default_factory=TrainingParams)

    @field_validator("data_path", "model_path", "output_dir")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip(" "):
            raise ValueError("must not be blank")
        if v.strip(" ").startswith("-"):
            raise ValueError("must not start with '-' (swift would read it as an option)")
        # Control characters and the like are refused by the path sandbox, with the field's name.
        return v.strip(" ")

    @field_validator("time_limit")
    @classmethod
    def _time_limit(cls, v: int | str | None) -> int | None:
        return None if v is None else parse_time_limit(v)

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, v: str | None) -> str | None:
        if v is not None and not JOB_ID_RE.match(v):
            raise ValueError(f"job_id must be {JOB_ID_HELP}")
        return v

    @field_validator("gpu_ids")
    @classmethod
    def _gpu_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if any(i < 0 for i in v) or len(set(v)) != len(v):
            raise ValueError("gpu_ids must be distinct non-negative GPU indices")
        return sorted(v)

    @property
    def time_limit_seconds(self) -> int | None:
        return None if self.time_limit is None else parse_time_limit(self.time_limit)

    @model_validator(mode="after")
    def _consistent(self) -> JobCreate:
        if self.gpu_ids is not None:
            if "num_gpus" in self.model_fields_set and self.num_gpus != len(self.gpu_ids):
                raise ValueError(f"num_gpus={self.num_gpus} disagrees with {len(self.gpu_ids)} gpu_ids")
            self.num_gpus = len(self.gpu_ids)
        if self.kind == "rlhf":
            self.rlhf_type = self.rlhf_type or "dpo"
        elif self.rlhf_type is not None:
            raise ValueError(f"rlhf_type is for kind 'rlhf' (this job's kind is '{self.kind}')")
        if self.num_gpus == 0 and self.training.torch_dtype == "bfloat16":
            raise ValueError(
                "torch_dtype bfloat16 needs a GPU: use float32 for a CPU-only job (num_gpus 0), or ask for GPUs"
            )
        return self


class JobPatch(_Strict):
    priority: int = Field(..., ge=0, le=10)


class ExportRequest(_Strict):
    """What `swift export` makes of a checkpoint. Every field is optional: an empty body merges the last one."""

    checkpoint: str | None = Field(
        None, max_length=4096, examples=["checkpoint-20"],
        description="one of the job's checkpoints as GET .../checkpoints lists it: its path, or its folder name "
        "(checkpoint-20; v1-.../checkpoint-20 when several runs have one of that name). Default: the last",
    )  # fmt: skip
    merge_lora: bool = Field(True, description="merge the LoRA adapter into the base model (--merge_lora true)")
    quant_bits: int | None = Field(None, ge=1, le=8, description="quantize the exported model (--quant_bits)")
    quant_method: str | None = Field(None, pattern=r"^[a-z0-9_]{1,16}$", examples=["awq"],
                                     description="with quant_bits: awq, gptq, bnb, fp8 (--quant_method)")  # fmt: skip
    output_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", examples=["merged-v1"],
        description="write it to <output_dir>/exports/<output_name> (default: <checkpoint>-merged next to the "
        "checkpoint, as swift does)",
    )  # fmt: skip


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


PendingCode = Literal["priority", "resources", "reservation", "outside_processes", "owner_limit", "never",
                      "processor_stopped"]  # fmt: skip


class PendingReason(BaseModel):
    """Why a queued job waits (Slurm's REASON column)."""

    code: PendingCode = Field(
        ...,
        description="priority: jobs ahead of it go first; resources: not enough free GPUs; reservation: the free "
        "GPUs are held for job_id until about starts_at; outside_processes: GPUs it needs are busy with processes "
        "the server did not start; owner_limit: its owner holds MAX_GPUS_PER_OWNER GPUs; never: the request "
        "cannot be met on these GPUs; processor_stopped: the queue processor is off or no scheduler runs",
    )
    message: str
    job_id: str | None = Field(None, description="reservation: the job the GPUs are held for")
    starts_at: float | None = Field(None, description="reservation: when that job should start (Unix seconds)")


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
    start_time: float | None = Field(None, description="process start time (Unix seconds), against reused pids")
    launched_at: float = Field(..., description="when the scheduler launched it (Unix seconds)")
    ready_at: float | None = Field(None, description="when the runner had started and read its job (Unix seconds)")


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
    path: str | None = None
    error: str | None = None
    pid: int | None = None
    process_start_time: float | None = None
    command: list[str] | None = None
    log_file: str | None = None
    exit_code: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    runner: RunnerInfo | None = None


class Job(BaseModel):
    """A job as stored. Every top-level field is one field of the job's Redis hash."""

    job_id: str
    status: JobStatus
    priority: int
    owner: str | None = Field(None, description="the name of the API key that created it (None: no keys)")
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
    resume_from: str | None = Field(None, description="the checkpoint the next run resumes from")
    attempts: list[Attempt] = Field(default_factory=list, description="one per run")
    last_checkpoint_at: float | None = Field(None, description="when the current run last saved a checkpoint")
    export_stop_requested: bool = False
    run_dir: str | None = None
    exit_code: int | None = None
    error_message: str | None = None
    error_code: str | None = Field(
        None,
        description="why it failed: exit_code, signal, launch, time_limit, runner_lost, runner_terminated, lost",
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
        if self.started_at is None:
            return None
        return (self.finished_at or now) - self.started_at


class LossPoint(BaseModel):
    step: int
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    epoch: float | None = None
    time: float | None = None


class Event(BaseModel):
    id: str
    time: float
    type: str
    message: str
    actor: str | None = Field(None, description="who caused it: an API key's name, 'anonymous' or 'scheduler'")
    data: dict[str, Any] = Field(default_factory=dict)
