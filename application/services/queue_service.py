"""The GPU queue endpoints: what is waiting, in which order, for how long, and the processor's switch."""

from __future__ import annotations

import time
from typing import Any

from application.auth import Caller
from application.exceptions import Conflict
from application.models.training_model import JobStatus, WaitEstimate
from application.services.job_store import JobStore
from application.services.queue_processor import ClusterView, QueueProcessor
from application.services.scheduler import format_wait
from application.services.training_service import TrainingService


def _estimate(seconds: float | None) -> dict[str, Any] | None:
    return WaitEstimate(seconds=seconds, text=format_wait(seconds)).model_dump() if seconds is not None else None


def free_gpu_count(view: ClusterView, min_free_gb: float, max_util: float) -> int:
    return sum(
        1
        for g in view.gpus
        if g.held_by is None and g.memory_free_gb >= min_free_gb and (g.utilization or 0.0) <= max_util
    )


class QueueService:
    def __init__(self, service: TrainingService) -> None:
        self.service = service
        self.store: JobStore = service.store
        self.processor: QueueProcessor = service.processor
        self.settings = service.settings

    async def overview(self, offset: int, limit: int, caller: Caller) -> dict[str, Any]:
        view = await self.processor.view()
        queue = await self.processor.queued(limit, start=offset)
        waits = await self.processor.wait_estimates(view, offset + limit)
        now = time.time()
        entries = [
            {
                "position": offset + i + 1,
                "job_id": q.job_id,
                "owner": q.owner,
                "mine": caller.owns(q.owner),
                "priority": q.priority,
                "num_gpus": q.num_gpus,
                "gpu_ids": list(q.gpu_ids) if q.gpu_ids is not None else None,
                "min_gpu_memory_gb": q.min_gpu_memory_gb,
                "submitted_at": q.submitted_at,
                "waited_seconds": round(max(0.0, now - q.submitted_at), 3),
                "estimated_wait_time": _estimate(waits.get(q.job_id)),
            }
            for i, q in enumerate(queue)
        ]
        length = await self.store.queue_length()
        return {
            "entries": entries,
            "summary": {
                "length": length,
                "offset": offset,
                "limit": limit,
                "total_gpus": len(view.gpus),
                "free_gpus": free_gpu_count(
                    view, self.settings.GPU_MIN_FREE_MEMORY_GB, self.settings.GPU_MAX_UTILIZATION
                ),
                "running_jobs": len(view.running),
                "policy": self.settings.QUEUE_POLICY.value,
                "processor_running": (await self.processor.switch())[0],
                "gpu_error": view.snapshot.error,
            },
        }

    async def process(self) -> dict[str, Any]:
        started = await self.processor.run_pass()
        return {
            "started": started,
            "queue_length": await self.store.queue_length(),
            "message": f"started {len(started)} job(s)" if started else "no queued job fits the free GPUs now",
        }

    async def remove(self, job_id: str, caller: Caller) -> dict[str, Any]:
        job = await self.service.require(job_id, caller)
        if job.status != JobStatus.QUEUED:
            raise Conflict(f"job '{job_id}' is {job.status.value}, not queued: use POST .../jobs/{job_id}/stop")
        await self.service.cancel(job_id, (JobStatus.QUEUED,), "removed from the GPU queue", caller)
        message = "Removed from the queue and cancelled"
        return {"job_id": job_id, "status": JobStatus.CANCELLED.value, "message": message}

    async def job_status(self, job_id: str, caller: Caller) -> dict[str, Any]:
        job = await self.service.require(job_id, caller)
        position = await self.store.queue_position(job_id) if job.status == JobStatus.QUEUED else None
        if position is None:
            return {"job_id": job_id, "queued": False, "status": job.status.value, "queue_position": None,
                    "jobs_ahead": None, "estimated_wait_time": None,
                    "message": f"the job is not queued: it is {job.status.value}"}  # fmt: skip
        view = await self.processor.view()
        waits = await self.processor.wait_estimates(view, position)
        return {
            "job_id": job_id, "queued": True, "status": job.status.value, "queue_position": position,
            "jobs_ahead": position - 1, "priority": job.priority, "num_gpus": job.num_gpus,
            "waited_seconds": round(time.time() - (job.queued_at or job.created_at), 3),
            "estimated_wait_time": _estimate(waits.get(job_id)),
        }  # fmt: skip

    async def processor_status(self) -> dict[str, Any]:
        s = self.processor.stats
        enabled, since = await self.processor.switch()
        return {
            "running": enabled and self.processor.alive,
            "since": since,
            "passes": s.passes,
            "jobs_started": s.jobs_started,
            "last_pass_at": s.last_pass_at,
            "last_pass_ms": s.last_pass_ms,
            "last_started": s.last_started,
            "last_error": s.last_error,
            "last_error_at": s.last_error_at,
            "poll_interval_seconds": self.settings.QUEUE_POLL_INTERVAL,
            "policy": self.settings.QUEUE_POLICY.value,
        }

    async def start_processor(self) -> dict[str, Any]:
        changed = await self.processor.set_enabled(True)
        msg = "processor started" if changed else "processor already running"
        return {**await self.processor_status(), "message": msg}

    async def stop_processor(self) -> dict[str, Any]:
        changed = await self.processor.set_enabled(False)
        msg = "processor stopped: queued jobs wait; running jobs go on" if changed else "processor was not running"
        return {**await self.processor_status(), "message": msg}
