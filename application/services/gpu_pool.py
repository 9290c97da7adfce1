"""The GPUs as the scheduler sees them: the inventory's snapshot joined with our leases."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from application.models.job_request import JobCreate
from application.services.scheduler import GpuState, QueuedJob
from application.utils.gpu_utils import GpuSnapshot

MB_PER_GB = 1024.0


def gpu_states(snapshot: GpuSnapshot, leases: Mapping[int, str]) -> list[GpuState]:
    return [
        GpuState(
            index=g.index,
            memory_usable_gb=math.inf if g.size_unknown else g.memory_usable_mb / MB_PER_GB,
            memory_free_gb=g.memory_free_mb / MB_PER_GB,
            utilization=g.utilization,
            held_by=leases.get(g.index),
            readable=g.error is None,
        )
        for g in snapshot.gpus
    ]


def impossible_request(req: JobCreate, snapshot: GpuSnapshot) -> str | None:
    """Why this server can never run the request, or None. (A busy GPU is not a reason: the job queues.)"""
    return impossible(req.num_gpus, req.gpu_ids, req.min_gpu_memory_gb, snapshot)


def impossible(num_gpus: int, gpu_ids: Sequence[int] | None, min_gpu_memory_gb: float | None,
               snapshot: GpuSnapshot) -> str | None:  # fmt: skip
    """`impossible_request` of a job's GPU request (a stored job: the GPUs may have changed since its create)."""
    if num_gpus == 0:
        return None
    if snapshot.gpus_unknown:
        return None
    count = len(snapshot.gpus)
    hint = " (use num_gpus 0 for a CPU-only run)" if count == 0 else ""
    where = f"this server has {count} GPU{'s' if count != 1 else ''}"
    if snapshot.error and count == 0:
        where += f" ({snapshot.error})"
    if gpu_ids is not None:
        known = {g.index for g in snapshot.gpus}
        unknown = [i for i in gpu_ids if i not in known]
        if unknown:
            return f"gpu_ids {unknown} do not exist: {where}, indices {sorted(known)}{hint}"
    elif num_gpus > count:
        return f"num_gpus={num_gpus} can never be met: {where}{hint}"
    if min_gpu_memory_gb is not None:
        candidates = [g for g in snapshot.gpus if gpu_ids is None or g.index in gpu_ids]
        big = [g for g in candidates if g.size_unknown or g.memory_usable_mb / MB_PER_GB >= min_gpu_memory_gb]
        if len(big) < num_gpus:
            largest = max((g.memory_usable_mb / MB_PER_GB for g in candidates), default=0.0)
            return (
                f"min_gpu_memory_gb={min_gpu_memory_gb:g} can never be met on {num_gpus} GPU(s): "
                f"{where}, the largest offers {math.floor(largest * 100) / 100:.2f} GiB (its total less what the "
                "driver reserves)"
            )
    return None


def never_free(snapshot: GpuSnapshot, min_free_gb: float, num_gpus: int = 1) -> str | None:
    """Why `num_gpus` GPUs here can never count as free together whatever a request asks: GPU_MIN_FREE_MEMORY_GB
    past their memory, the operator's setting (a job then queued for ever, its user told to change its request:
    hunt CE); None when they can."""
    if num_gpus == 0 or not snapshot.gpus or min_free_gb <= 0:
        return None
    sizes = [math.inf if g.size_unknown else g.memory_usable_mb / MB_PER_GB for g in snapshot.gpus]
    if sum(size >= min_free_gb for size in sizes) >= num_gpus:
        return None
    largest = math.floor(max(sizes) * 100) / 100
    return (
        f"the server's setting GPU_MIN_FREE_MEMORY_GB={min_free_gb:g} (the memory a GPU must have free to take "
        f"a job) leaves fewer than {num_gpus} of its GPUs that can ever count as free (the largest offers "
        f"{largest:.2f} GiB): no request can change that; its operator must lower the setting"
    )


def queued_job(job_id: str, priority: int, submitted_at: float, num_gpus: int, gpu_ids: Sequence[int] | None,
               min_gpu_memory_gb: float | None, estimated_duration: float | None = None, *,
               owner: str | None = None, retry_at: float | None = None) -> QueuedJob:  # fmt: skip
    return QueuedJob(
        job_id=job_id,
        priority=priority,
        submitted_at=submitted_at,
        num_gpus=num_gpus,
        gpu_ids=tuple(gpu_ids) if gpu_ids is not None else None,
        min_gpu_memory_gb=min_gpu_memory_gb,
        estimated_duration=estimated_duration,
        owner=owner,
        retry_at=retry_at,
    )
