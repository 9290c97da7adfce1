"""GPUs, system status and health."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse

from application.api.deps import E403, CallerDep, KnownCallerDep, Responses, System
from application.models.job_responses import ErrorResponse
from application.models.system_model import GpuList, Health, SystemStatus, WebhookKey

router = APIRouter()
NOT_SIGNED: Responses = {
    404: {
        "model": ErrorResponse,
        "description": "The server signs no notification (no WEBHOOK_SECRET); or no API "
        "key has the name an admin's ?owner= gives",
    }
}
public = APIRouter(tags=["system"])


@router.get("/gpus", response_model=GpuList, tags=["gpus"], operation_id="list_gpus",
            summary="GPUs: memory, utilization, temperature, processes and the job holding each")  # fmt: skip
async def gpus(system: System) -> dict[str, Any]:
    return await system.gpus()


@router.get("/system/status", response_model=SystemStatus, tags=["system"],
            summary="CPU, memory, disk, load, GPUs, job counts, Redis, version, uptime")  # fmt: skip
async def get_system_status(system: System) -> dict[str, Any]:
    return await system.system_status()


@router.get("/webhooks/signing-key", response_model=WebhookKey, tags=["system"], responses=NOT_SIGNED,
            operation_id="get_webhook_signing_key",
            summary="The key that signs the notifications to your jobs' own webhook_url")  # fmt: skip
async def get_webhook_signing_key(system: System, caller: CallerDep, response: Response) -> WebhookKey:
    """Each key's owner has one of its own, derived from the operator's WEBHOOK_SECRET: with it a receiver checks
    that a notification came from this server, and it signs nothing of another owner's nor the operator's."""
    response.headers["Cache-Control"] = "no-store"  # (a secret: no cache or proxy on the way keeps it, review DW)
    return await system.signing_key(caller)


@router.post("/webhooks/signing-key/rotate", response_model=WebhookKey, tags=["system"],
             responses={**E403, **NOT_SIGNED}, operation_id="rotate_webhook_signing_key",
             summary="Replace the key that signs your jobs' notifications (the one before signs no more)")  # fmt: skip
async def rotate_webhook_signing_key(
    system: System, caller: CallerDep, response: Response,
    owner: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                                       description="an admin key: another owner's (default: the key's own)")] = None,
) -> WebhookKey:  # fmt: skip
    """For a key that may have been seen by someone else (an API key rotated under the same name keeps its signing
    key): deliveries begun from now on, of earlier notifications too, are signed with the new one."""
    response.headers["Cache-Control"] = "no-store"
    return await system.signing_key(caller, owner, rotate=True)


@public.get("/health", response_model=None, responses={200: {"model": Health}, 503: {"model": Health}},
            summary="200 when Redis answers, 503 with the reason when it does not")  # fmt: skip
async def get_health(system: System, caller: KnownCallerDep) -> JSONResponse:
    """Needs no API key, so load balancers and health checks can call it. Where keys are configured, a caller
    without a valid one sees the status and what is up, not the errors, leader, paths or versions behind it."""
    ok, body = await system.health(full=caller is not None)
    return JSONResponse(body, status_code=200) if ok else JSONResponse(body, 503, headers={"Retry-After": "5"})
