"""The GPU queue endpoints: what is waiting, in which order, for how long, and the processor's switch."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from application.auth import Caller
from application.exceptions import ApiError, Conflict, refused
from application.models.training_model import JobStatus
from application.services import clock
from application.services.cluster_store import reading_error
from application.services.job_store import TransitionRefused
from application.services.predictions import ratio_summary
from application.services.queue_planner import (
    ESTIMATE_WINDOW,
    ClusterView,
    as_queued,
    pending_reason,
    wait_estimate,
)
from application.services.scheduler import Plan, gpu_is_free
from application.services.training_service import TrainingService
from application.services.wait_reasons import Reason

PASS_WAIT_SECONDS = 10.0


class NoScheduler(ApiError):
    status_code = 503


def free_gpu_count(view: ClusterView, min_free_gb: float, max_util: float) -> int:
    return sum(1 for g in view.gpus if gpu_is_free(g, min_free_gb=min_free_gb, max_util=max_util))


async def _nothing() -> Plan:
    return Plan([], {}, {})


class QueueService:
    def __init__(self, service: TrainingService) -> None:
        self.service = service
        self.store = service.store
        self.cluster = service.cluster
        self.settings = service.settings

    async def overview(self, offset: int, limit: int, caller: Caller) -> dict[str, Any]:
        # (The length read with the page: read apart, it disagreed with the entries while jobs came and went.)
        view, (length, page), state, head, clocks = await asyncio.gather(
            self.service.view(), self.store.queue_page(offset, limit), self.service.placement.pass_state(),
            self.cluster.queue_head(), self.store.head_clocks(),
        )  # fmt: skip
        queue = [as_queued(job_id, meta) for job_id, meta in page]
        stopped = state.stopped
        # Planned only when the page can use it: a page past the forecast's reach, an empty one, or one while no
        # pass runs planned up to 1,000 jobs on the loop in vain (hunt DM: 10-24 ms a request).
        told = queue and offset < ESTIMATE_WINDOW and stopped is None
        planned = self.service.planner.forecast(view, offset + limit, head, clocks) if told else _nothing()
        forecast, since = await asyncio.gather(planned, self.store.queued_since([q.job_id for q in queue]))
        now = clock.now()
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
                "waited_seconds": round(max(0.0, now - (since[i] or q.submitted_at)), 3),
                # Nothing starts while no pass runs: no wait can be told (as the job's own views say).
                "estimated_wait_time": None if stopped else wait_estimate(forecast.waits.get(q.job_id)),
                "predicted_duration_seconds": q.estimated_duration,
                # Past the forecast's reach its waits and reasons are unknown: the jobs ahead come first (a null
                # reason says the next pass starts it, which the job's own views did not say).
                "pending_reason": pending_reason(
                    forecast.reasons.get(q.job_id) if offset + i < ESTIMATE_WINDOW else Reason("priority"),
                    now,
                    stopped,
                ),
            }
            for i, q in enumerate(queue)
        ]
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
                "processor_running": state.enabled and state.leading,
                "starts_held": state.held if state.leading else None,
                "gpu_error": reading_error(view.snapshot, now),
            },
        }

    async def process(self) -> dict[str, Any]:
        if await self.cluster.leader() is None:
            raise NoScheduler("no scheduler is running to make a pass: start one (python start.py scheduler)")
        started = await self.cluster.request_pass(uuid.uuid4().hex, PASS_WAIT_SECONDS)
        if started is None:
            raise NoScheduler(f"the scheduler made no pass within {PASS_WAIT_SECONDS:g} s, or its pass failed (GET "
                              "/queue/processor/status says why): try again")  # fmt: skip
        length = await self.store.queue_length()
        none = "the queue is empty" if not length else "no queued job fits the free GPUs now"  # (hunt CN)
        return {
            "started": started,
            "queue_length": length,
            "message": f"started {len(started)} job(s)" if started else none,
        }

    async def remove(self, job_id: str, caller: Caller) -> dict[str, Any]:
        job = await self.service.require(job_id, caller)
        if job.status.is_terminal():
            raise Conflict(f"job '{job_id}' is {job.status.value}: it has left the queue already")
        if job.status != JobStatus.QUEUED:
            raise Conflict(f"job '{job_id}' is {job.status.value}, not queued: use POST .../jobs/{job_id}/stop")
        try:
            to = await self.service.leave_queue(job, "removed from the GPU queue", caller)
        except TransitionRefused as exc:
            raise refused(job_id, exc, "job '{id}' is {status} now: it can no longer be cancelled") from None
        message = "Removed from the queue and cancelled" if to == JobStatus.CANCELLED else \
            "Removed from the queue and stopped (POST .../resume resumes it from its checkpoint)"  # fmt: skip
        return {"job_id": job_id, "status": to.value, "message": message}

    async def job_status(self, job_id: str, caller: Caller) -> dict[str, Any]:
        job = await self.service.require(job_id, caller)
        position = await self.store.queue_position(job_id) if job.status == JobStatus.QUEUED else None
        if position is None:
            return {"job_id": job_id, "queued": False, "status": job.status.value, "queue_position": None,
                    "jobs_ahead": None, "estimated_wait_time": None,
                    "message": f"the job is not queued: it is {job.status.value}"}  # fmt: skip
        info = await self.service.placement.queue_info(job_id)
        return {
            "job_id": job_id, "queued": True, "status": job.status.value, "queue_position": info.position or position,
            "jobs_ahead": (info.position or position) - 1, "priority": job.priority, "num_gpus": job.num_gpus,
            "waited_seconds": round(max(0.0, clock.now() - (job.queued_at or job.created_at)), 3),
            "estimated_wait_time": info.estimate, "pending_reason": info.reason,
            "predicted_duration": job.predicted_duration,
        }  # fmt: skip

    async def processor_status(self) -> dict[str, Any]:
        (enabled, since), leader, stats, ratios = await asyncio.gather(
            self.cluster.processor_switch(), self.cluster.leader(), self.cluster.pass_stats(),
            self.service.history.ratios(),
        )  # fmt: skip
        return {
            "running": enabled and leader is not None,
            "enabled": enabled,
            "since": since,
            "leader": leader.scheduler_id if leader else None,
            "passes": stats.get("passes", 0),
            "jobs_started": stats.get("jobs_started", 0),
            "last_pass_at": stats.get("last_pass_at"),
            "last_pass_ms": stats.get("last_pass_ms"),
            "last_started": stats.get("last_started", []),
            "last_error": stats.get("last_error"),
            "last_error_at": stats.get("last_error_at"),
            "poll_interval_seconds": self.settings.QUEUE_POLL_INTERVAL,
            "policy": self.settings.QUEUE_POLICY.value,
            "starvation_seconds": self.settings.QUEUE_STARVATION_SECONDS,
            "prediction_error": ratio_summary(ratios),
        }

    async def start_processor(self) -> dict[str, Any]:
        changed = await self.cluster.set_processor_switch(True)
        msg = "processor started" if changed else "processor already running"
        return {**await self.processor_status(), "message": msg}

    async def stop_processor(self) -> dict[str, Any]:
        changed = await self.cluster.set_processor_switch(False)
        msg = "processor stopped: queued jobs wait; running jobs go on" if changed else "processor was not running"
        return {**await self.processor_status(), "message": msg}
