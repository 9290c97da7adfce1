"""Building `swift sft|pt|rlhf` / `swift export` argv lists (never shell strings) and finding the ms-swift version."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from application.config import CLIENT_VARIABLES, Settings
from application.models.job_request import TrainingParams
from application.models.training_model import Job
from application.services import process_group as pg
from application.services.swift_arguments import argv_of
from application.utils.regular_files import open_regular

NEWEST_MAJOR = 4
_VL_NAME = re.compile(r"(^|[-_/.])(vl|vision|omni|llava|internvl|minicpm-v|cogvlm|qvq)([-_/.0-9]|$)", re.I)


@dataclass(frozen=True)
class SwiftVersion:
    version: str | None
    source: str  # "setting", "detected" or "assumed"

    @property
    def major(self) -> int:
        if self.version is None:
            return NEWEST_MAJOR
        return int(self.version.split(".")[0])

    def tuner_flag(self) -> str:
        # 4.x renamed --train_type to --tuner_type; the wrong one is a fatal `remaining_argv` error.
        return "--tuner_type" if self.major >= 4 else "--train_type"


# What a console script's shebang names when it is a Python's (python3, python3.11, pypy3): a wrapper script
# for /bin/sh is none, and its shell reading the probe (a Python file) said "Syntax error".
_PYTHON_NAME = re.compile(r"(?:python|pypy)[\d.]*")
PIP_EXEC = b"'''exec' "  # (pip's sh launcher, the line after its shebang)


def not_a_python_script(swift_bin: str) -> str | None:
    """Why ms-swift's arguments and version cannot be read through `swift_bin` (it runs, but is no console script
    of a Python), or None."""
    path = shutil.which(swift_bin)
    if path is None or _interpreter_of(path) is not None:
        return None
    return (f"SWIFT_BIN={swift_bin} is not ms-swift's console script (its first line names no Python: a wrapper "
            "script?), so ms-swift's arguments and version cannot be read from it: point SWIFT_BIN at ms-swift's "
            "own `swift`, and set SWIFT_VERSION")  # fmt: skip


def _interpreter_of(executable: str) -> str | None:
    """The Python that runs a console script: the one in its shebang, or in the '''exec' line pip writes under
    a `#!/bin/sh` one when the Python's path is too long for a shebang or holds a space."""
    try:
        with open(executable, "rb") as fh:
            first, second = fh.readline(512), fh.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    if second.startswith(PIP_EXEC):
        try:
            parts = shlex.split(second[len(PIP_EXEC) :].decode(errors="replace"))
        except ValueError:
            return None
        return parts[0] if parts and _PYTHON_NAME.fullmatch(Path(parts[0]).name) else None
    parts = first[2:].decode(errors="replace").strip().split()
    if not parts:
        return None
    interpreter = shutil.which(parts[1]) if Path(parts[0]).name == "env" and len(parts) > 1 else parts[0]
    return interpreter if interpreter and _PYTHON_NAME.fullmatch(Path(interpreter).name) else None


def interpreter_of(swift_bin: str) -> str | None:
    """The Python that `swift_bin` (a name on PATH or a path) runs in, or None."""
    path = shutil.which(swift_bin)
    return _interpreter_of(path) if path else None


def detect_swift_version(swift_bin: str, override: str | None, timeout: float = 30.0) -> SwiftVersion:
    """The installed ms-swift version. The CLI has no --version: ask the Python environment it runs in."""
    if override:
        logger.info("ms-swift version {} (from the SWIFT_VERSION setting)", override)
        return SwiftVersion(override, "setting")
    path = shutil.which(swift_bin)
    python = _interpreter_of(path) if path else None
    if python:
        try:
            out = subprocess.run(
                [python, "-c", "import importlib.metadata as m; print(m.version('ms-swift'))"],
                capture_output=True, text=True, timeout=timeout, check=False, env=probe_env(),
            )  # fmt: skip
            version = out.stdout.strip()
            if out.returncode == 0 and re.fullmatch(r"\d+(\.\d+)*\S*", version):
                logger.info("ms-swift version {} (detected in {})", version, python)
                return SwiftVersion(version, "detected")
        except (OSError, subprocess.TimeoutExpired):
            pass
    logger.warning(
        "Could not detect the ms-swift version behind SWIFT_BIN={} ({}); assuming the newest major, {}.x. "
        "Set SWIFT_VERSION to override.",
        swift_bin,
        "not found" if not path else f"interpreter {python or 'unknown'}",
        NEWEST_MAJOR,
    )
    return SwiftVersion(None, "assumed")


def is_local_model(model_path: str) -> bool:
    return Path(model_path).is_dir()


def is_multimodal(model_path: str, explicit: bool | None) -> bool:
    """--vit_lr/--aligner_lr crash ms-swift on a text-only model, so pass them only for vision-language ones."""
    if explicit is not None:
        return explicit
    config = Path(model_path) / "config.json"
    if config.is_file():
        try:
            with open_regular(config) as f:
                data = json.loads(f.read(16 << 20))
        except (OSError, ValueError, RecursionError):
            data = {}
        if isinstance(data, dict) and ("vision_config" in data or "visual" in data):
            return True
        if isinstance(data, dict):
            archs = " ".join(data.get("architectures") or [])
            return bool(re.search(r"VL|Vision|Llava|ImageText", archs))
    return bool(_VL_NAME.search(model_path))


def torch_dtype_for(job: Job) -> str:
    if job.training.torch_dtype:
        return job.training.torch_dtype
    # bf16 fails on a machine without a GPU ("Your setup doesn't support bf16/gpu").
    return "bfloat16" if job.num_gpus > 0 else "float32"


def _fmt(value: float | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def build_sft_command(
    swift_bin: str, job: Job, version: SwiftVersion, *, resume_from: str | None = None, weights_only: bool = False
) -> list[str]:
    """swift sft's arguments for `job`; `resume_from` a checkpoint (`weights_only`: it holds no optimizer state,
    as with save_only_model, so swift loads only the weights and keeps the global step, as its web UI does)."""
    if job.kind == "export" and job.export_argv:
        return list(job.export_argv)  # fixed when the export was asked for (services/quant_exports.py)
    t: TrainingParams = job.training
    extra = t.extra_arguments
    more_data = extra.pop("dataset", None) or []
    argv = [
        swift_bin, job.kind,
        "--model", job.model_path,
        "--dataset", job.data_path, *more_data,
        "--output_dir", job.output_dir,
        version.tuner_flag(), t.train_type,
        "--torch_dtype", torch_dtype_for(job),
        "--num_train_epochs", _fmt(t.num_epochs),
        "--per_device_train_batch_size", _fmt(t.batch_size),
        "--learning_rate", _fmt(t.learning_rate),
        "--lora_rank", _fmt(t.lora_rank),
        "--lora_alpha", _fmt(t.lora_alpha),
        "--gradient_accumulation_steps", _fmt(t.gradient_accumulation_steps),
        "--eval_steps", _fmt(t.eval_steps),
        "--save_steps", _fmt(t.save_steps),
        "--save_total_limit", _fmt(t.save_total_limit),
        "--logging_steps", _fmt(t.logging_steps),
        "--max_length", _fmt(t.max_length),
        "--warmup_ratio", _fmt(t.warmup_ratio),
        "--dataloader_num_workers", _fmt(t.dataloader_num_workers),
        "--dataset_num_proc", _fmt(t.dataset_num_proc),
        "--save_only_model", _fmt(t.save_only_model),
    ]  # fmt: skip
    if is_multimodal(job.model_path, t.multimodal):
        argv += ["--vit_lr", _fmt(t.vit_lr), "--aligner_lr", _fmt(t.aligner_lr)]
    if t.max_steps is not None:
        argv += ["--max_steps", _fmt(t.max_steps)]
    if t.split_dataset_ratio is not None:
        argv += ["--split_dataset_ratio", _fmt(t.split_dataset_ratio)]
    if t.model_type:
        argv += ["--model_type", t.model_type]
    if t.template:
        argv += ["--template", t.template]
    if job.kind == "rlhf":
        argv += ["--rlhf_type", job.rlhf_type or "dpo"]
    if is_local_model(job.model_path) and "check_model" not in extra:
        # Otherwise swift spends ~20 s trying to reach the model hub for a local folder.
        argv += ["--check_model", "false"]
    argv += argv_of(extra)
    if resume_from is not None:
        argv += ["--resume_from_checkpoint", resume_from]
        if weights_only:
            argv += ["--resume_only_model", "true"]
    return argv


def build_export_command(
    swift_bin: str, checkpoint: str, *, exist_ok: bool, output_dir: str | None = None
) -> list[str]:
    argv = [swift_bin, "export", "--adapters", checkpoint, "--merge_lora", "true"]
    if output_dir is not None:
        argv += ["--output_dir", output_dir]
    if exist_ok:
        argv += ["--exist_ok", "true"]
    return argv


GPU_VARIABLES = ("NPROC_PER_NODE", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")
# The server's own settings (API keys, Redis credentials, the webhook secret, ...) are no business of swift, which
# runs code a user chose (a hub model's remote code, report_to integrations): kept out of its environment.
SERVER_VARIABLES = tuple(sorted({*Settings.model_fields, *CLIENT_VARIABLES}))
_SERVER_NAMES = frozenset(SERVER_VARIABLES)


def build_env(
    base: Mapping[str, str], gpu_ids: list[int], *, master_port: int | None = None, extra: Mapping[str, str] = {}
) -> dict[str, str]:
    """The whole environment of a swift process: `base` with the GPU variables set explicitly (then `extra`)."""
    env = {k: v for k, v in base.items() if k not in GPU_VARIABLES and k not in _SERVER_NAMES}
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # so NVML's indices and CUDA's agree
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpu_ids)  # "" = no GPU for a CPU-only job
    env["PYTHONUNBUFFERED"] = "1"
    if len(gpu_ids) > 1:
        env["NPROC_PER_NODE"] = str(len(gpu_ids))
        if master_port:
            env["MASTER_PORT"] = str(master_port)
    env.update(extra)
    return env


def probe_env() -> dict[str, str]:
    """What a look at the installed ms-swift runs with: this process's environment less the server's settings
    (its keys, Redis password, webhook secret: ms-swift's imports are not ours to trust with them), no GPU."""
    return build_env(os.environ, [])


def visible_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables the job's detail shows (the rest is the server's own environment)."""
    names = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NPROC_PER_NODE", "MASTER_PORT")
    return {k: env[k] for k in names if k in env}


def swift_env(gpu_env: dict[str, str] | None, run: str | None) -> dict[str, str]:
    """The runner's own environment (explicit, from the launcher) with the run's GPU variables; none given
    means no GPU (an export merges on the CPU: the training GPUs already went back to the queue). Marked with
    the run (`pg.RUN_MARK`), so that what is left of it can be told from another group that has its number."""
    return build_env(os.environ, [], extra={**(gpu_env or {}), **({pg.RUN_MARK: run} if run else {})})
