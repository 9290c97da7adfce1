"""GPUs, system status and health."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from application.api.deps import E404, CallerDep, KnownCallerDep, System
from application.exceptions import NotFound
from application.models.system_model import GpuList, Health, SystemStatus, WebhookKey
from application.services.webhooks import owner_key

router = APIRouter()
public = APIRouter(tags=["system"])


@router.get("/gpus", response_model=GpuList, tags=["gpus"], operation_id="list_gpus",
            summary="GPUs: memory, utilization, temperature, processes and the job holding each")  # fmt: skip
async def gpus(system: System) -> dict[str, Any]:
    return await system.gpus()


@router.get("/system/status", response_model=SystemStatus, tags=["system"],
            summary="CPU, memory, disk, load, GPUs, job counts, Redis, version, uptime")  # fmt: skip
async def get_system_status(system: System) -> dict[str, Any]:
    return await system.system_status()


@router.get("/webhooks/signing-key", response_model=WebhookKey, tags=["system"], responses=E404,
            operation_id="get_webhook_signing_key",
            summary="The key that signs the notifications to your jobs' own webhook_url")  # fmt: skip
async def get_webhook_signing_key(system: System, caller: CallerDep) -> WebhookKey:
    """Each key's owner has one of its own, derived from the operator's WEBHOOK_SECRET: with it a receiver checks
    that a notification came from this server, and it signs nothing of another owner's nor the operator's."""
    secret = system.service.settings.WEBHOOK_SECRET
    if secret is None:
        raise NotFound("this server signs no notification (its operator has set no WEBHOOK_SECRET)")
    return WebhookKey(owner=caller.name, signing_key=owner_key(secret.get_secret_value(), caller.name))


@public.get("/health", response_model=None, responses={200: {"model": Health}, 503: {"model": Health}},
            summary="200 when Redis answers, 503 with the reason when it does not")  # fmt: skip
async def get_health(system: System, caller: KnownCallerDep) -> JSONResponse:
    """Needs no API key, so load balancers and health checks can call it. Where keys are configured, a caller
    without a valid one sees the status and what is up, not the errors, leader, paths or versions behind it."""
    ok, body = await system.health(full=caller is not None)
    return JSONResponse(body, status_code=200) if ok else JSONResponse(body, 503, headers={"Retry-After": "5"})
