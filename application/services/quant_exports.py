"""Quantized exports: `swift export --quant_method awq|gptq|bnb|fp8` quantizes on CUDA, so it runs as a job of its
own (kind "export") that the queue starts on a free GPU like a training run, with its lease, runner, log, stop
and watchdog. The job it exports keeps a record of it in `exports` (its status read from that job).

Pure apart from the disk checks in `prepare_quant_job` (which checkpoint exists, whether the target is taken).
"""

from __future__ import annotations

from pathlib import Path

from application.exceptions import Conflict, Invalid
from application.models.job_request import ExportRequest, TrainingParams
from application.models.training_model import ExportInfo, ExportStatus, Job, JobStatus, PredictedDuration
from application.services.checkpoints import own_checkpoints
from application.services.exports import (
    ENDED_WITH_SWIFT,
    export_escape,
    merging_into_default,
    name_taken,
    pick_checkpoint,
)
from application.services.path_sandbox import RealFolder
from application.services.swift_info import SwiftInfo

# awq and gptq calibrate on samples of a data set: the job's own.
CALIBRATED = frozenset({"awq", "gptq", "gptq_v2"})
# What each method takes, where ms-swift (or the library under it) fails only once the export has its GPU:
# bitsandbytes 4 or 8 bits, AutoAWQ's GEMM kernels 4, optimum's GPTQ 2, 3, 4 or 8.
METHOD_BITS: dict[str, frozenset[int]] = {
    "bnb": frozenset({4, 8}),
    "awq": frozenset({4}),
    "gptq": frozenset({2, 3, 4, 8}),
    "gptq_v2": frozenset({2, 3, 4, 8}),
}


def wants_quantization(request: ExportRequest | None) -> bool:
    return request is not None and (request.quant_bits is not None or request.quant_method is not None)


def check_quantization(request: ExportRequest, info: SwiftInfo | None, gpus: int) -> None:
    """Invalid unless the installed ms-swift offers this quantization and the server has a GPU for it."""
    method, bits = request.quant_method, request.quant_bits
    if method is None:
        raise Invalid("quant_bits needs quant_method (awq, gptq, bnb or fp8)")
    if bits is None and method != "fp8":
        raise Invalid(f"quant_method {method} needs quant_bits (e.g. 4)")
    if info is not None and (fields := info.arguments.get("ExportArguments")):
        methods = (fields.get("quant_method") or {}).get("choices") or []
        if methods and method not in methods:
            raise Invalid(f"quant_method '{method}' is not one of ms-swift {info.version}'s: {', '.join(methods)}")
        sizes = (fields.get("quant_bits") or {}).get("choices") or []
        if bits is not None and sizes and bits not in sizes:
            raise Invalid(f"quant_bits {bits} is not one of {', '.join(str(b) for b in sizes)}")
    if bits is not None and method in METHOD_BITS and bits not in METHOD_BITS[method]:
        raise Invalid(f"quant_method {method} takes quant_bits {' or '.join(map(str, sorted(METHOD_BITS[method])))}, "
                      f"not {bits}")  # fmt: skip
    if info is None and method not in METHOD_BITS and method != "fp8":
        raise Invalid(f"quant_method '{method}' is not one of awq, gptq, gptq_v2, bnb, fp8 (the installed ms-swift's "
                      "own list could not be read)")  # fmt: skip
    if gpus == 0:
        raise Invalid("quantized exports run on a GPU and this server has none: export with merge_lora only, "
                      "or quantize on a GPU server")  # fmt: skip


def quant_argv(swift_bin: str, parent: Job, checkpoint: str, request: ExportRequest, target: Path) -> list[str]:
    argv = [swift_bin, "export"]
    if parent.training.train_type == "full":
        argv += ["--model", checkpoint]
    else:
        # swift merges the adapter first (into <checkpoint>-merged), then quantizes that into --output_dir.
        argv += ["--adapters", checkpoint, "--merge_lora", "true"]
    # A run paused or preempted after swift made --output_dir runs again into it (refused without it). The
    # folder is this export's own: its name was free when it was asked for.
    argv += ["--exist_ok", "true"]
    argv += ["--quant_method", str(request.quant_method)]
    if request.quant_bits is not None:
        argv += ["--quant_bits", str(request.quant_bits)]
    if request.quant_method in CALIBRATED:
        argv += ["--dataset", parent.data_path]
    return [*argv, "--output_dir", str(target)]


def prepare_quant_job(
    parent: Job, request: ExportRequest, swift_bin: str, output_root: Path, job_id: str, now: float
) -> tuple[Job, ExportInfo]:
    """The export job for `parent` and the record its `exports` keeps; Conflict/Invalid say why not."""
    if parent.status not in ENDED_WITH_SWIFT:
        raise Conflict(f"job '{parent.job_id}' is {parent.status.value}: export needs a finished training run "
                       "(completed, stopped, failed or paused, with a checkpoint)")  # fmt: skip
    if not request.merge_lora and parent.training.train_type != "full":  # (run with --merge_lora true regardless)
        raise Invalid("a quantized export quantizes the model with its LoRA adapter merged: leave merge_lora out "
                      "(or true), or export without quant_method to keep the adapter apart")  # fmt: skip
    checkpoint = pick_checkpoint(parent, request.checkpoint, own_checkpoints(parent, output_root))
    # swift merges the adapter into <checkpoint>-merged first, or takes what that folder holds: not while another
    # export of the checkpoint writes it (a merge into it, or another quantized export). (A full model's is not
    # merged.)
    if parent.training.train_type != "full" and merging_into_default(parent, checkpoint):
        raise Conflict(f"an export of {Path(checkpoint).name} is writing {Path(checkpoint).name}-merged, which a "
                       "quantized export reads: wait for it to end")  # fmt: skip
    bits = f"-int{request.quant_bits}" if request.quant_bits is not None else ""
    name = request.output_name or f"{Path(checkpoint).name}-{request.quant_method}{bits}"
    exports = Path(parent.output_dir) / "exports"
    target = exports / name
    if name_taken(parent, target):
        if request.output_name is None:
            raise Conflict(f"the default output folder 'exports/{name}' is taken by an earlier export of this "
                           "checkpoint (written, or still running): name another with output_name")  # fmt: skip
        raise Conflict(f"output_name '{name}' is taken by an earlier export: choose another")
    adapters = checkpoint if parent.training.train_type != "full" else None
    if why := quant_escape(Path(parent.output_dir), target, adapters, output_root):
        raise Conflict(why)
    argv = quant_argv(swift_bin, parent, checkpoint, request, target)
    job = Job(
        job_id=job_id, status=JobStatus.QUEUED, priority=parent.priority, owner=parent.owner,
        data_path=parent.data_path, model_path=checkpoint, output_dir=str(exports / f".{name}.job"),
        output_dir_requested=str(exports / f".{name}.job"), num_gpus=1, kind="export", export_of=parent.job_id,
        export_argv=argv, training=TrainingParams(), created_at=now, updated_at=now, queued_at=now,
        predicted_duration=PredictedDuration(), webhook_url=parent.webhook_url,  # its end is the export's end
    )  # fmt: skip
    info = ExportInfo(
        status=ExportStatus.RUNNING, export_id=job_id, job_id=job_id, checkpoint=checkpoint, merge_lora=True,
        quant_bits=request.quant_bits, quant_method=request.quant_method, output_dir=str(target), command=argv,
        log_file=str(Path(job.output_dir) / "logs" / f"{job_id}.train.log"), started_at=now,
    )  # fmt: skip
    return job, info


def quant_escape(folder: Path, target: Path, adapters: str | None, output_root: Path) -> str | None:
    """Why a quantized export would read or write out of its job's folder `folder` through a symlink: its target
    (as a merge's), and for a LoRA `<adapters>-merged`, where swift merges the adapter first or takes the model
    already there (a link to another owner's merged model would be quantized into this job's exports/)."""
    if why := export_escape(folder, target, output_root):
        return why
    merged = Path(f"{adapters}-merged") if adapters else None
    if merged is not None and not RealFolder(folder).holds(merged):
        return (f"{merged} leads out of the job's folder {folder} (a symlink): swift merges the adapter there, or "
                "reads the model already there, before it quantizes; remove the link")  # fmt: skip
    return None


def export_job_escape(job: Job, output_root: Path) -> str | None:
    """quant_escape again as an export job starts, from the argv fixed when it was asked for: a link made since."""
    argv = job.export_argv or []
    if "--output_dir" not in argv:
        return None
    target = Path(argv[argv.index("--output_dir") + 1])
    adapters = argv[argv.index("--adapters") + 1] if "--adapters" in argv else None
    return quant_escape(target.parent.parent, target, adapters, output_root)  # (<job folder>/exports/<name>)
