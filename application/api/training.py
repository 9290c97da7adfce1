"""The HTTP API under {API_PREFIX}/training. Routes stay thin: the services do the work."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from fastapi.responses import JSONResponse

from application.models.training_model import (
    JOB_ID_HELP,
    ActionResponse,
    CreateResponse,
    ErrorResponse,
    EventList,
    Job,
    JobCreate,
    JobList,
    JobPatch,
    JobStatus,
    LogsResponse,
    ProgressResponse,
    StatusResponse,
)
from application.services.queue_service import QueueService
from application.services.system_service import SystemService
from application.services.training_service import TrainingService

router = APIRouter(prefix="/training")

JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$", description=JOB_ID_HELP)]

Responses = dict[int | str, dict[str, Any]]
E404: Responses = {404: {"model": ErrorResponse, "description": "No job with this id"}}
E409: Responses = {409: {"model": ErrorResponse, "description": "The job's status does not allow this action"}}
E422: Responses = {422: {"model": ErrorResponse, "description": "Invalid input: the message says what to change"}}
E503: Responses = {503: {"model": ErrorResponse, "description": "Redis does not answer"}}


def _training(request: Request) -> TrainingService:
    return request.app.state.training


def _queue(request: Request) -> QueueService:
    return request.app.state.queue


def _system(request: Request) -> SystemService:
    return request.app.state.system


Training = Annotated[TrainingService, Depends(_training)]
Queue = Annotated[QueueService, Depends(_queue)]
System = Annotated[SystemService, Depends(_system)]


# ---- jobs ---------------------------------------------------------------------------------------------


@router.post("/jobs", status_code=status.HTTP_201_CREATED, response_model=CreateResponse,
             responses={**E409, **E422, **E503}, summary="Create a training job")  # fmt: skip
async def create_job(body: JobCreate, svc: Training) -> CreateResponse:
    """`pending` when its GPUs are free now (start it with POST start, or pass `auto_start: true`);
    `queued` with its position and wait estimate when they are not: it then starts by itself."""
    return await svc.create(body)


@router.post("/jobs/{job_id}/start", response_model=ActionResponse, responses={**E404, **E409},
             summary="Start a pending job (a queued one starts by itself)")  # fmt: skip
async def start_job(job_id: JobId, svc: Training) -> ActionResponse:
    return await svc.start(job_id)


@router.post("/jobs/{job_id}/stop", response_model=ActionResponse, responses={**E404, **E409},
             summary="Stop a running job (SIGTERM to its group, then SIGKILL), or cancel a waiting one")  # fmt: skip
async def stop_job(job_id: JobId, svc: Training) -> ActionResponse:
    return await svc.stop(job_id)


@router.post("/jobs/{job_id}/export", response_model=ActionResponse, responses={**E404, **E409},
             summary="Merge the last LoRA checkpoint into the model (swift export --merge_lora true)")  # fmt: skip
async def export_job(job_id: JobId, svc: Training) -> ActionResponse:
    return await svc.export(job_id)


@router.get("/jobs/{job_id}/status", response_model=StatusResponse, responses=E404, summary="Job status")
async def job_status(job_id: JobId, svc: Training) -> StatusResponse:
    return await svc.status(job_id)


@router.get("/jobs/{job_id}/progress", response_model=ProgressResponse, responses=E404,
            summary="Training progress and the loss history")  # fmt: skip
async def job_progress(
    job_id: JobId, svc: Training,
    history_limit: Annotated[int, Query(ge=0, le=100_000, description="last N history points")] = 1000,
) -> ProgressResponse:  # fmt: skip
    return await svc.progress(job_id, history_limit)


@router.get("/jobs/{job_id}", response_model=Job, responses=E404, summary="Everything about one job")
async def job_detail(job_id: JobId, svc: Training) -> Job:
    """Includes `command` (the exact argv swift ran) and `command_line`."""
    return await svc.store.require(job_id)


@router.patch("/jobs/{job_id}", response_model=Job, responses={**E404, **E409, **E422},
              summary="Change the priority of a pending or queued job (re-sorts the queue)")  # fmt: skip
async def patch_job(job_id: JobId, body: JobPatch, svc: Training) -> Job:
    return await svc.set_priority(job_id, body.priority)


@router.get("/jobs", response_model=JobList, summary="List jobs, newest first")
async def list_jobs(
    svc: Training,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> JobList:
    return await svc.list_jobs(status_filter, offset, limit)


@router.delete("/jobs/{job_id}", status_code=status.HTTP_204_NO_CONTENT, responses={**E404, **E409},
               summary="Delete a job's record (never its training output on disk)")  # fmt: skip
async def delete_job(job_id: JobId, svc: Training) -> Response:
    await svc.delete(job_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/jobs/{job_id}/logs", response_model=LogsResponse, responses=E404,
            summary="Last lines of the job's combined stdout/stderr")  # fmt: skip
async def job_logs(
    job_id: JobId, svc: Training,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    kind: Annotated[Literal["train", "export"], Query(description="the training run's log or the export's")] = "train",
) -> LogsResponse:  # fmt: skip
    return await svc.logs(job_id, limit, kind)


@router.get("/jobs/{job_id}/events", response_model=EventList, responses=E404,
            summary="The job's events, oldest first; page with `after`")  # fmt: skip
async def job_events(
    job_id: JobId, svc: Training,
    after: Annotated[
        str | None, Query(pattern=r"^\d{1,19}-\d{1,19}$", description="the last event id already seen")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EventList:  # fmt: skip
    return await svc.events(job_id, after, limit)


# ---- GPUs, system, health -----------------------------------------------------------------------------


@router.get("/gpus", summary="GPUs: memory, utilization, temperature, processes and the job holding each")
async def gpus(system: System) -> dict[str, Any]:
    return await system.gpus()


@router.get("/system/status", summary="CPU, memory, disk, load, GPUs, job counts, Redis, version, uptime")
async def system_status(system: System) -> dict[str, Any]:
    return await system.system_status()


@router.get("/health", responses=E503, summary="200 when Redis answers, 503 with the reason when it does not")
async def health(system: System) -> JSONResponse:
    ok, body = await system.health()
    return JSONResponse(body, status_code=200 if ok else 503)


# ---- queue (processor routes first: /queue/processor/... must not match /queue/{job_id}/...) ------------


@router.get("/queue/processor/status", summary="Queue processor state")
async def processor_status(queue: Queue) -> dict[str, Any]:
    return await queue.processor_status()


@router.post("/queue/processor/start", summary="Start automatic starts of queued jobs")
async def processor_start(queue: Queue) -> dict[str, Any]:
    return await queue.start_processor()


@router.post("/queue/processor/stop", summary="Stop automatic starts (running jobs go on; POST /queue/process works)")
async def processor_stop(queue: Queue) -> dict[str, Any]:
    return await queue.stop_processor()


@router.get("/queue", summary="The GPU queue in order, with wait estimates")
async def queue_overview(
    queue: Queue,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> dict[str, Any]:
    return await queue.overview(offset, limit)


@router.post("/queue/process", summary="Run one queue pass now; says which jobs started")
async def queue_process(queue: Queue) -> dict[str, Any]:
    return await queue.process()


@router.delete("/queue/{job_id}", responses={**E404, **E409}, summary="Remove a queued job (it becomes cancelled)")
async def queue_remove(job_id: JobId, queue: Queue) -> dict[str, Any]:
    return await queue.remove(job_id)


@router.get("/queue/{job_id}/status", responses=E404, summary="A job's place in the queue")
async def queue_job_status(job_id: JobId, queue: Queue) -> dict[str, Any]:
    return await queue.job_status(job_id)
