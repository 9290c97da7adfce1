"""The HTTP API under {API_PREFIX}/training. Routes stay thin: the services do the work.

Every route but GET /health needs an API key when keys are configured (see `deps.current_caller`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request, Response, status

from application.api import artifacts, files, queue, streams, system
from application.api.artifacts import page_response
from application.api.deps import (
    COMMON,
    E404,
    E409,
    E429,
    WITH_BODY,
    CallerDep,
    Control,
    Exports,
    IdempotencyDep,
    JobId,
    Training,
    current_caller,
)
from application.api.route_path import route_path
from application.auth import Caller
from application.models.job_request import ExportRequest, JobCreate, JobPatch
from application.models.job_responses import (
    ActionResponse,
    CheckpointList,
    CreateResponse,
    EventList,
    ExportList,
    JobList,
    LogsResponse,
    ProgressResponse,
    StatusResponse,
)
from application.models.training_model import Job, JobStatus
from application.services.idempotency import Idempotency, fingerprint, held_claim
from application.services.index_pages import CURSOR_HELP, CURSOR_PATTERN
from application.services.training_service import TrainingService

# What "Try it out" sends: jobs that run as they are (the hub ids download on first use).
CREATE_EXAMPLES: dict[str, Any] = {
    "hub": {
        "summary": "A hub model and data set (downloads on first use)",
        "value": {"data_path": "AI-ModelScope/alpaca-gpt4-data-en#500", "model_path": "Qwen/Qwen2.5-0.5B-Instruct",
                  "output_dir": "qwen-alpaca", "num_gpus": 1, "priority": 5, "auto_start": True,
                  "training": {"num_epochs": 1, "max_length": 2048}},
    },
    "local": {
        "summary": "A local model folder and data set (inside MODEL_ROOTS / DATA_ROOTS), a 2 h limit",
        "value": {"data_path": "train.jsonl", "model_path": "Qwen2.5-0.5B-Instruct", "output_dir": "local-run",
                  "num_gpus": 1, "auto_start": True, "time_limit": "2h", "max_retries": 1,
                  "training": {"max_steps": 200, "save_steps": 50}},
    },
    # (The others ask for a GPU, which a server without one answers 422: the README's quick start, on the CPU.)
    "cpu": {
        "summary": "On the CPU (num_gpus 0): the README's tiny model and data set, in ./models and ./datasets",
        "value": {"data_path": "data.jsonl", "model_path": "tiny-qwen2", "output_dir": "tiny-swagger", "num_gpus": 0,
                  "auto_start": True,
                  "training": {"model_type": "qwen2", "template": "qwen2_5", "max_steps": 20, "save_steps": 10}},
    },
}  # fmt: skip

# A body Swagger UI made up from the fields' own examples asked for a quantization (a GPU job) with 1 bit, which
# awq refuses: the first example is what "Try it out" sends, a plain merge.
EXPORT_EXAMPLES: dict[str, Any] = {
    "merge": {"summary": "Merge the last checkpoint next to it (<checkpoint>-merged)", "value": {}},
    "named": {"summary": "Merge one checkpoint into <output_dir>/exports/<output_name>",
              "value": {"checkpoint": "checkpoint-20", "output_name": "merged-v1"}},
    "quantized": {"summary": "Merge and quantize (a GPU job of its own, queued as a create is)",
                  "value": {"quant_bits": 4, "quant_method": "awq", "output_name": "awq-int4"}},
}  # fmt: skip

IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=255, pattern=r"^[\x21-\x7e]{1,255}$",
           description="a retry with the same key and body gets the first answer (kept 24 h)"),
]  # fmt: skip

jobs = APIRouter(tags=["jobs"])


async def _print(request: Request, job_id: str | None = None) -> str:
    path = route_path(request.scope)
    if job_id is not None:
        # Which job, too: a job deleted and created again under its id is another job, and the same key sent for
        # it replayed the deleted one's answer ("cancelled", of a job still pending: hunt BR).
        training: TrainingService = request.app.state.training
        path += "\0" + await training.created_stamp(job_id)
    return fingerprint(request.method, path, await request.body())


async def _action(request: Request, job_id: str, caller: Caller, idem: Idempotency, key: str | None,
                  act: Callable[[], Awaitable[ActionResponse]]) -> Response:  # fmt: skip
    """An action on a job, its answer kept under the request's Idempotency-Key (when it has one)."""

    async def call() -> tuple[int, ActionResponse, dict[str, str]]:
        return 200, await act(), {}

    return await idem.run(caller.name, key, lambda: _print(request, job_id), call)


@jobs.post("/jobs", status_code=status.HTTP_201_CREATED, response_model=CreateResponse,
           responses={**E409, **E429, **WITH_BODY}, summary="Create a training job")  # fmt: skip
async def create_job(body: Annotated[JobCreate, Body(openapi_examples=CREATE_EXAMPLES)], request: Request,
                     svc: Training, caller: CallerDep, idem: IdempotencyDep,
                     idempotency_key: IdempotencyKey = None) -> Response:  # fmt: skip
    """`pending` when its GPUs are free now (start it with POST start, or pass `auto_start: true`);
    `queued` with its position and wait estimate when they are not: it then starts by itself.

    Local paths must lie inside DATA_ROOTS / MODEL_ROOTS; a local data set and model folder are checked
    before the job is stored, so a job that could not start is refused now (422) rather than after its wait."""

    async def call() -> tuple[int, CreateResponse, dict[str, str]]:
        created = await svc.create(body, caller, held_claim())
        # The job's path, written out: url_for searches every route, a tenth of a create's cost.
        return 201, created, {"Location": f"{request.scope.get('root_path', '')}{svc.settings.API_PREFIX}"
                                          f"/training/jobs/{created.job_id}"}  # fmt: skip

    return await idem.run(caller.name, idempotency_key, lambda: _print(request), call)


@jobs.post("/jobs/{job_id}/start", response_model=ActionResponse, responses={**E404, **E409},
           summary="Start a pending job (a queued one starts by itself)")  # fmt: skip
async def start_job(job_id: JobId, request: Request, svc: Training, caller: CallerDep, idem: IdempotencyDep,
                    idempotency_key: IdempotencyKey = None) -> Response:  # fmt: skip
    return await _action(request, job_id, caller, idem, idempotency_key, lambda: svc.start(job_id, caller))


@jobs.post("/jobs/{job_id}/stop", response_model=ActionResponse, responses={**E404, **E409},
           summary="Stop a running job (SIGTERM to its group, then SIGKILL), or cancel a waiting one")  # fmt: skip
async def stop_job(job_id: JobId, request: Request, control: Control, caller: CallerDep, idem: IdempotencyDep,
                   idempotency_key: IdempotencyKey = None) -> Response:  # fmt: skip
    return await _action(request, job_id, caller, idem, idempotency_key, lambda: control.stop(job_id, caller))


@jobs.post("/jobs/{job_id}/export", response_model=ActionResponse, responses={**E404, **E409, **E429, **WITH_BODY},
           summary="Merge a LoRA checkpoint into the model (swift export --merge_lora true)")  # fmt: skip
async def export_job(job_id: JobId, request: Request, exports: Exports, caller: CallerDep, idem: IdempotencyDep,
                     body: Annotated[ExportRequest | None, Body(openapi_examples=EXPORT_EXAMPLES)] = None,
                     idempotency_key: IdempotencyKey = None) -> Response:  # fmt: skip
    """Without a body: the last checkpoint, merged next to it (`<checkpoint>-merged`). Each export is kept:
    GET .../exports lists them."""
    return await _action(
        request, job_id, caller, idem, idempotency_key, lambda: exports.export(job_id, caller, body, held_claim())
    )


@jobs.get("/jobs/{job_id}/exports", response_model=ExportList, responses=E404,
          summary="Every export of the job, oldest first (the last is the current one)")  # fmt: skip
async def list_job_exports(job_id: JobId, exports: Exports, caller: CallerDep) -> ExportList:
    return ExportList(job_id=job_id, exports=await exports.exports(job_id, caller))


@jobs.post("/jobs/{job_id}/pause", response_model=ActionResponse, responses={**E404, **E409},
           summary="Pause a running job: its GPUs go back; it resumes from its last checkpoint")  # fmt: skip
async def pause_job(job_id: JobId, request: Request, ctl: Control, caller: CallerDep, idem: IdempotencyDep,
                    idempotency_key: IdempotencyKey = None) -> Response:  # fmt: skip
    """Stops the run like a stop (SIGTERM to its process group, grace, SIGKILL). swift saves nothing on SIGTERM:
    the answer says which checkpoint and step the job will resume from, and how many steps since are lost."""

    return await _action(request, job_id, caller, idem, idempotency_key, lambda: ctl.pause(job_id, caller))


@jobs.post("/jobs/{job_id}/resume", response_model=ActionResponse, responses={**E404, **E409, **E429},
           summary="Resume a paused job, or a stopped or failed one from its last checkpoint")  # fmt: skip
async def resume_job(job_id: JobId, request: Request, ctl: Control, caller: CallerDep, idem: IdempotencyDep,
                     idempotency_key: IdempotencyKey = None) -> Response:  # fmt: skip
    """Back in the queue at its place (priority, original submission time); the run gets the same arguments plus
    --resume_from_checkpoint <newest checkpoint>. A paused job with no checkpoint starts from the beginning."""

    return await _action(request, job_id, caller, idem, idempotency_key, lambda: ctl.resume(job_id, caller))


@jobs.get("/jobs/{job_id}/checkpoints", response_model=CheckpointList, responses=E404,
          summary="The checkpoints of every run of the job, newest `limit` past the newest `offset`")  # fmt: skip
async def list_job_checkpoints(
    job_id: JobId, ctl: Control, caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="the newest this many")] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000, description="skipping the newest this many")] = 0,
) -> CheckpointList:  # fmt: skip
    """With its step, time, the loss near it, its size; which one the next resume uses, and which was exported.
    Older ones page by `offset` (`total` says how many there are)."""
    return await ctl.checkpoints(job_id, caller, limit, offset)


@jobs.get("/jobs/{job_id}/status", response_model=StatusResponse, responses=E404, summary="Job status")
async def get_job_status(job_id: JobId, svc: Training, caller: CallerDep) -> StatusResponse:
    return await svc.status(job_id, caller)


@jobs.get("/jobs/{job_id}/progress", response_model=ProgressResponse, responses=E404,
          summary="Training progress and the loss history")  # fmt: skip
async def get_job_progress(
    job_id: JobId, svc: Training, caller: CallerDep,
    history_limit: Annotated[int, Query(ge=0, le=100_000, description="last N history points (0: none)")] = 1000,
) -> ProgressResponse:  # fmt: skip
    return await svc.progress(job_id, history_limit, caller)


@jobs.get("/jobs/{job_id}", response_model=None, responses={200: {"model": Job}, **E404},
          summary="Everything about one job")  # fmt: skip
async def get_job(job_id: JobId, svc: Training, caller: CallerDep) -> Response:
    """Includes `command` (the exact argv swift ran) and `command_line`."""
    return Response(await svc.job_json(job_id, caller), media_type="application/json")


@jobs.patch("/jobs/{job_id}", response_model=Job, responses={**E404, **E409, **WITH_BODY},
            summary="Change the priority of a pending or queued job (re-sorts the queue)")  # fmt: skip
async def update_job_priority(job_id: JobId, body: JobPatch, svc: Training, caller: CallerDep) -> Job:
    return await svc.set_priority(job_id, body.priority, caller)


@jobs.get("/jobs", response_model=None, responses={200: {"model": JobList}}, summary="List jobs, newest first")
async def list_jobs(
    svc: Training,
    caller: CallerDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    owner: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                                       description="one owner's; a user key sees its own (another's: none)")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    cursor: Annotated[str | None, Query(pattern=CURSOR_PATTERN, description=CURSOR_HELP)] = None,
) -> Response:  # fmt: skip
    page = await svc.list_jobs(status_filter, owner, offset, limit, caller, cursor)
    return Response(page, media_type="application/json")


@jobs.delete("/jobs/{job_id}", status_code=status.HTTP_204_NO_CONTENT, responses={**E404, **E409},
             summary="Delete a job's record (never its training output on disk)")  # fmt: skip
async def delete_job(job_id: JobId, svc: Training, caller: CallerDep) -> Response:
    await svc.delete(job_id, caller)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@jobs.get("/jobs/{job_id}/logs", response_model=LogsResponse, responses={**E404, **E429},
          summary="Last lines of the job's combined stdout/stderr")  # fmt: skip
async def get_job_logs(
    job_id: JobId, svc: Training, caller: CallerDep, request: Request,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    kind: Annotated[Literal["train", "export"], Query(description="the training run's log or the export's")] = "train",
    attempt: Annotated[int | None, Query(ge=1, le=1000, description="an earlier run's log (default: the last)")] = None,
) -> Response:  # fmt: skip
    page = await svc.logs(job_id, limit, kind, caller, attempt)
    # Up to 10,000 lines of up to 16 K characters each: encoded in a thread, not on the loop every request shares.
    return await page_response(request, caller, await asyncio.to_thread(lambda: page.model_dump_json().encode()))


@jobs.get("/jobs/{job_id}/events", response_model=EventList, responses=E404,
          summary="The job's events, oldest first; page with `after`")  # fmt: skip
async def list_job_events(
    job_id: JobId, svc: Training, caller: CallerDep,
    after: Annotated[
        str | None, Query(pattern=r"^\d{1,19}-\d{1,19}$", description="the last event id already seen")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EventList:  # fmt: skip
    return await svc.events(job_id, after, limit, caller)


# Health answers without a key (load balancers and compose health checks have none); everything else needs one.
# Each router is included into the app on its own, not nested: FastAPI walks the tree of included routers on
# every request, and three levels of it cost a create a tenth of its time.
PROTECTED = (jobs, streams.router, artifacts.router, files.router, queue.router, system.router)


def include_routes(app: FastAPI, prefix: str) -> None:
    app.include_router(system.public, prefix=f"{prefix}/training")
    for protected in PROTECTED:
        app.include_router(protected, prefix=f"{prefix}/training", dependencies=[Depends(current_caller)],
                           responses=COMMON)  # fmt: skip
