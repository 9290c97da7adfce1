"""What routes depend on: the caller (from the API key), the services, and the error responses they document."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Path, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from application.api.query_names import refuse_unknown_query
from application.auth import Caller, KeyRing, presented_key
from application.exceptions import Invalid, Unauthorized
from application.models.job_request import JOB_ID_HELP
from application.models.job_responses import ErrorResponse, ValidationErrorResponse
from application.services.export_control import ExportControl
from application.services.idempotency import Idempotency
from application.services.queue_service import QueueService
from application.services.run_control import RunControl
from application.services.system_service import SystemService
from application.services.training_service import TrainingService

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key, as a header")


async def current_caller(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    api_key: Annotated[str | None, Security(_api_key)],
) -> Caller:
    ring: KeyRing = request.app.state.keys
    once = _given_once(request.scope["headers"])
    caller = ring.identify(bearer.credentials if bearer else api_key)
    if once is not None:  # (after the key: who has none is told that first)
        raise Invalid(f"the {once} header is given more than once: send it once")
    if request.scope.get("query_string"):
        refuse_unknown_query(request)
    return caller


_ONCE = {b"authorization": "Authorization", b"x-api-key": "X-API-Key", b"idempotency-key": "Idempotency-Key"}


def _given_once(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The first of the headers that may come once that came twice, or None: the first of two keys was used (the
    job was the first owner's), and of two Idempotency-Keys the first alone was kept (hunt AO)."""
    seen: set[bytes] = set()
    for name, _ in headers:
        if name in _ONCE:
            if name in seen:
                return _ONCE[name]
            seen.add(name)
    return None


async def known_caller(request: Request) -> Caller | None:
    """For a route open to everyone: the caller when their key is valid (or no keys are configured), else None.
    Read from the headers, not through the security schemes, which would list the route as needing a key."""
    ring: KeyRing = request.app.state.keys
    try:
        return ring.identify(presented_key(request.headers.get("authorization"), request.headers.get("x-api-key")))
    except Unauthorized:
        return None


async def admin_caller(caller: Annotated[Caller, Depends(current_caller)], request: Request) -> Caller:
    caller.require_admin(f"{request.method} {request.url.path.rsplit('/training', 1)[-1]}")
    return caller


# async: FastAPI runs a plain `def` dependency in a thread pool, a hop per request for a dictionary lookup.
async def _training(request: Request) -> TrainingService:
    return request.app.state.training


async def _control(request: Request) -> RunControl:
    return request.app.state.run_control


async def _exports(request: Request) -> ExportControl:
    return request.app.state.exports


async def _queue(request: Request) -> QueueService:
    return request.app.state.queue


async def _system(request: Request) -> SystemService:
    return request.app.state.system


async def _idempotency(request: Request) -> Idempotency:
    return request.app.state.idempotency


CallerDep = Annotated[Caller, Depends(current_caller)]
AdminDep = Annotated[Caller, Depends(admin_caller)]
KnownCallerDep = Annotated[Caller | None, Depends(known_caller)]
Training = Annotated[TrainingService, Depends(_training)]
Queue = Annotated[QueueService, Depends(_queue)]
Control = Annotated[RunControl, Depends(_control)]
Exports = Annotated[ExportControl, Depends(_exports)]
System = Annotated[SystemService, Depends(_system)]
IdempotencyDep = Annotated[Idempotency, Depends(_idempotency)]
JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$", max_length=128, description=JOB_ID_HELP)]

Responses = dict[int | str, dict[str, Any]]
E400: Responses = {400: {"model": ErrorResponse, "description": "The request body could not be read"}}
E401: Responses = {401: {"model": ErrorResponse, "description": "No valid API key (when keys are configured)"}}
E403: Responses = {403: {"model": ErrorResponse, "description": "An admin key is needed"}}
E404: Responses = {404: {"model": ErrorResponse, "description": "No job with this id (or not yours)"}}
E409: Responses = {409: {"model": ErrorResponse, "description": "The job's status does not allow this action"}}
E413: Responses = {413: {"model": ErrorResponse, "description": "The request body is larger than MAX_REQUEST_BYTES"}}
E422: Responses = {
    422: {"model": ValidationErrorResponse, "description": "Invalid input: the message says what to change"}
}
E429: Responses = {429: {"model": ErrorResponse, "description": "A limit was reached: retry after Retry-After seconds"}}
_NOT_READY = "Redis does not answer, or the server is not ready for this yet (the detail says why and when to retry)"
E503: Responses = {503: {"model": ErrorResponse, "description": _NOT_READY}}
# Every protected route can answer these.
COMMON: Responses = {**E401, **E422, **E503}
WITH_BODY: Responses = {**E400, **E413}
