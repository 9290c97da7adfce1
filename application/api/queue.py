"""The GPU queue routes: what waits, in which order, for how long; the processor's switch (admin only)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from application.api.deps import E403, E404, E409, E503, AdminDep, CallerDep, JobId, Queue
from application.models.system_model import (
    PassResult,
    ProcessorStatus,
    QueueJobStatus,
    QueueOverview,
    QueueRemoval,
)

router = APIRouter(tags=["queue"])

# Processor routes first: /queue/processor/... must not match /queue/{job_id}/...


@router.get("/queue/processor/status", response_model=ProcessorStatus, responses=E403,
            summary="Queue processor state (admin)")  # fmt: skip
async def get_processor_status(queue: Queue, caller: AdminDep) -> dict[str, Any]:
    return await queue.processor_status()


@router.post("/queue/processor/start", response_model=ProcessorStatus, responses=E403,
             summary="Start automatic starts of queued jobs (admin)")  # fmt: skip
async def start_processor(queue: Queue, caller: AdminDep) -> dict[str, Any]:
    return await queue.start_processor()


@router.post("/queue/processor/stop", response_model=ProcessorStatus, responses=E403,
             summary="Stop automatic starts (running jobs go on; POST /queue/process works) (admin)")  # fmt: skip
async def stop_processor(queue: Queue, caller: AdminDep) -> dict[str, Any]:
    return await queue.stop_processor()


@router.get("/queue", response_model=QueueOverview, summary="The GPU queue in order, with wait estimates")
async def get_queue(
    queue: Queue,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> dict[str, Any]:
    """Other owners' jobs are listed (they share the GPUs) with their place and size only."""
    return await queue.overview(offset, limit, caller)


@router.post("/queue/process", response_model=PassResult, responses=E503,
             summary="Run one queue pass now; says which jobs started")  # fmt: skip
async def process_queue(queue: Queue, caller: CallerDep) -> dict[str, Any]:
    return await queue.process()


@router.delete("/queue/{job_id}", response_model=QueueRemoval, responses={**E404, **E409},
               summary="Remove a queued job (cancelled; stopped when it ran before and left a checkpoint)")  # fmt: skip
async def remove_from_queue(job_id: JobId, queue: Queue, caller: CallerDep) -> dict[str, Any]:
    return await queue.remove(job_id, caller)


@router.get("/queue/{job_id}/status", response_model=QueueJobStatus, responses=E404,
            summary="A job's place in the queue")  # fmt: skip
async def get_queue_job_status(job_id: JobId, queue: Queue, caller: CallerDep) -> dict[str, Any]:
    return await queue.job_status(job_id, caller)
