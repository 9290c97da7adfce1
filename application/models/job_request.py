"""What a client sends: the create request (with its Swift parameters), a priority change, an export request.

Strict models: a request says what it means ("5" is not a priority), unknown fields are refused, except in
`training`, which takes any argument of the installed ms-swift (checked by services/swift_arguments.py).
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from application.services.predictions import parse_time_limit

JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
TrainingKind = Literal["sft", "pt", "rlhf"]
# Other names of TrainingParams fields and of ms-swift arguments, accepted in `training` and stored under the
# second name. ms-swift 2.x's names are mapped, never passed on: 3.x and 4.x exit with `remaining_argv` on them.
ALIASES = {
    "num_train_epochs": "num_epochs",
    "per_device_train_batch_size": "batch_size",
    "tuner_type": "train_type",
    "lora_target_modules": "target_modules",
    "sft_type": "train_type",
}
# Far beyond any real run (a million steps is a long pre-training), yet a number every step rule can compute
# with: 10**400 steps were a 500 (the duration prediction's float overflowed). A rule of new jobs (JobCreate):
# a stored job with more (save_steps 999999999, "never save", was common) must still read.
MAX_STEPS = 100_000_000
STEP_FIELDS = ("max_steps", "save_steps", "eval_steps", "logging_steps")
JOB_ID_HELP = "1-128 characters: letters, digits, '_', '.', '-', starting with a letter or digit"


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

    num_epochs: int | float = Field(1, gt=0, le=1000, description="--num_train_epochs (0.5: half an epoch)")
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
    # (below 1 for a new job: JobCreate; a job stored before that rule must still read)
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="below 1; 0 when warmup_steps is given")
    dataloader_num_workers: int = Field(4, ge=0, le=128)
    dataset_num_proc: int = Field(4, ge=1, le=256)
    save_only_model: bool = True
    # ms-swift 4.6.0's get_supported_tuners(), its tuner plugins included (less its test-only "dummy").
    train_type: Literal["lora", "full", "longlora", "adalora", "llamapro", "adapter", "vera", "boft", "fourierft",
                        "reft", "bone", "ia3", "lora_llm"] = "lora"  # fmt: skip
    torch_dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None, description="default: bfloat16 on GPUs, float32 for a CPU-only job (num_gpus 0)"
    )
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    split_dataset_ratio: float | None = Field(None, ge=0, lt=1)
    # (a first '-' would make swift read the value as an option: its start failed on an argument error)
    model_type: str | None = Field(None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$",
                                   description="needed by custom models")  # fmt: skip
    template: str | None = Field(None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$",
                                 description="needed by custom models")  # fmt: skip
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
    auto_start: bool = Field(False, description="start at once when its GPUs are free; without it such a job waits "
                             "as pending for POST .../start (a job whose GPUs are busy is queued either way, and "
                             "starts by itself when they free up)")  # fmt: skip
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

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        import httpx  # here: every runner imports this module, and only a request's URL needs httpx (~0.1 s)

        try:  # as the delivery will read it (httpx is stricter than urlsplit: IDNA, brackets, ports)
            url = httpx.URL(v)
            parts = urlsplit(v)
            parts.port  # noqa: B018  (a port that is no number raises here)
            host = url.host  # (an IDNA label that cannot be decoded raises here)
        except (httpx.InvalidURL, ValueError) as exc:
            raise ValueError(f"not a URL that can be posted to ({exc})") from None
        if not host or not parts.hostname:
            raise ValueError("names no host")
        return v

    @field_validator("time_limit", mode="before")
    @classmethod
    def _whole_seconds(cls, v: Any) -> Any:
        # (else the union's two refusals: "time_limit.int: Input should be a valid integer; time_limit.str: ...")
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            return int(v)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, str))):
            raise ValueError("time_limit is whole seconds (3600) or text such as '90m', '2h', '1h30m', '1d'")
        return v

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
        if self.num_gpus == 0 and self.min_gpu_memory_gb is not None:
            raise ValueError("min_gpu_memory_gb is GPU memory: leave it out with num_gpus 0 (a CPU-only run), or ask "
                             "for GPUs")  # fmt: skip
        if self.kind == "rlhf":
            self.rlhf_type = self.rlhf_type or "dpo"
        elif self.rlhf_type is not None:
            raise ValueError(f"rlhf_type is for kind 'rlhf' (this job's kind is '{self.kind}')")
        t = self.training
        # ms-swift 4.x refuses a warmup_ratio of 1, and warmup_steps beside a warmup_ratio: naming the steps
        # replaces the ratio's default. (Rules of a new job: the stored one is read as it was written.)
        if t.warmup_ratio >= 1:
            raise ValueError("training.warmup_ratio must be less than 1 (or use training.warmup_steps)")
        for name in STEP_FIELDS:
            if (getattr(t, name) or 0) > MAX_STEPS:
                raise ValueError(f"training.{name} must be at most {MAX_STEPS:,} steps")
        if (t.model_extra or {}).get("warmup_steps") is not None:
            if "warmup_ratio" in t.model_fields_set and t.warmup_ratio > 0:
                raise ValueError("training.warmup_steps and training.warmup_ratio: set one of them (ms-swift "
                                 "refuses both)")  # fmt: skip
            t.warmup_ratio = 0.0
        fsdp = (t.model_extra or {}).get("fsdp")
        if fsdp not in (None, "") and _sharded(fsdp):
            # ms-swift refuses save_only_model (this server's default) beside FSDP2's sharded state dict, and the
            # job failed after its wait. Naming fsdp turns the default off, as naming warmup_steps does the ratio.
            if "save_only_model" in t.model_fields_set and t.save_only_model:
                raise ValueError("training.fsdp saves a sharded state dict, which ms-swift refuses beside "
                                 "save_only_model true: leave save_only_model out (it is then false), or set "
                                 "fsdp_config.state_dict_type FULL_STATE_DICT")  # fmt: skip
            t.save_only_model = False
        if self.num_gpus == 0 and self.training.torch_dtype == "bfloat16":
            raise ValueError(
                "torch_dtype bfloat16 needs a GPU: use float32 for a CPU-only job (num_gpus 0), or ask for GPUs"
            )
        return self


def _sharded(fsdp: Any) -> bool:
    """Whether swift's FSDP2 saves a sharded state dict with this `fsdp` (its default unless the config says)."""
    if isinstance(fsdp, str):
        try:
            fsdp = json.loads(fsdp)
        except ValueError:
            return True  # a preset: fsdp2's is sharded
    config = fsdp.get("fsdp_config") if isinstance(fsdp, dict) else None
    kind = config.get("state_dict_type") if isinstance(config, dict) else None
    return not isinstance(kind, str) or "SHARDED" in kind.upper()


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
