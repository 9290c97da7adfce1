"""The dashboard's pages: / (jobs), /ui/jobs/{id}, /ui/queue, /ui/gpus, /ui/new, /ui/login.

The lists are rendered here from the same services the API routes call (as the caller the page's key names),
so they read without JavaScript; the static scripts add live charts, logs and actions through the API.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.encoders import jsonable_encoder
from fastapi.routing import APIRoute
from redis.exceptions import RedisError
from starlette.responses import Response

from application.api.artifacts import download_response
from application.auth import Caller
from application.exceptions import ApiError, JobNotFound
from application.models.job_request import JOB_ID_RE
from application.models.training_model import JobStatus
from application.services import artifacts
from application.services.redis_service import REDIS_AWAY
from application.ui import job_view, views
from application.ui.html import PageContext, esc, page, template
from application.ui.session import context, login_redirect, ui_caller
from application.ui.session import router as session_router


class _PageRoute(APIRoute):
    """A page that cannot read Redis says so as a page (503), not with the API's JSON: a reload during an outage
    showed the browser `{"detail": ...}`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RedisError as exc:
                down = isinstance(exc, REDIS_AWAY)
                why = "does not answer" if down else f"refused the read ({exc})"
                body = (f"<h1>Not available</h1><p class='error'>The server's store (Redis) {esc(why)}: nothing can "
                        "be shown now. Jobs that run go on; reload this page in a moment.</p>")  # fmt: skip
                shown = page(context(request, ui_caller(request)), "Not available", body, status_code=503)
                shown.headers["Retry-After"] = "5"
                return shown

        return handle


router = APIRouter(include_in_schema=False, route_class=_PageRoute)
router.include_router(session_router)

OWNER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
MAX_LIMIT = 500
EVENTS_SHOWN = 1000


def _int(raw: str | None, default: int, low: int, high: int) -> int:
    """A query number, clamped: a page link someone edited by hand still renders."""
    try:
        return min(high, max(low, int(raw))) if raw else default
    except ValueError:
        return default


def _error_page(ctx: PageContext, exc: ApiError, title: str) -> Response:
    body = f"<h1>{esc(title)}</h1><p class='error'>{esc(exc.detail)}</p>"
    return page(ctx, title, body, status_code=exc.status_code)


@router.get("/")
@router.get("/ui")
@router.get("/ui/jobs")
async def jobs_page(request: Request) -> Response:
    caller = ui_caller(request)
    if caller is None:
        return login_redirect(request)
    ctx = context(request, caller)
    q = request.query_params
    error = ""
    status: JobStatus | None = None
    if q.get("status"):
        try:
            status = JobStatus(q["status"])
        except ValueError:
            error = f"unknown status '{q['status']}': showing every status"
    owner = (q.get("owner") or None) if caller.is_admin else None  # a user's page has no owner filter
    if owner is not None and not OWNER_RE.match(owner):
        error, owner = f"an owner is 1-64 letters, digits, '_', '.' or '-', not '{owner}'", None
    offset, limit = _int(q.get("offset"), 0, 0, 10_000_000), _int(q.get("limit"), 50, 1, MAX_LIMIT)
    listing = json.loads(await request.app.state.training.list_jobs(status, owner, offset, limit, caller))
    body = views.jobs_body(ctx, listing, status.value if status else None, owner, caller.is_admin, error)
    return page(ctx, "Jobs", body, active="jobs")


@router.get("/ui/queue")
async def queue_page(request: Request) -> Response:
    caller = ui_caller(request)
    if caller is None:
        return login_redirect(request)
    ctx = context(request, caller)
    q = request.query_params
    offset, limit = _int(q.get("offset"), 0, 0, 10_000_000), _int(q.get("limit"), 100, 1, MAX_LIMIT)
    # Plain JSON values, as the API would send them (the service returns some fields as models).
    overview = jsonable_encoder(await request.app.state.queue.overview(offset, limit, caller))
    held_for = (
        e["pending_reason"]["job_id"] for e in overview["entries"] if (e.get("pending_reason") or {}).get("job_id")
    )
    own = await request.app.state.training.own_ids(held_for, caller)
    return page(ctx, "Queue", views.queue_body(ctx, overview, own), active="queue")


@router.get("/ui/gpus")
async def gpus_page(request: Request) -> Response:
    caller = ui_caller(request)
    if caller is None:
        return login_redirect(request)
    ctx = context(request, caller)
    reading = jsonable_encoder(await request.app.state.system.gpus())
    own = await request.app.state.training.own_ids((g["job_id"] for g in reading["gpus"] if g.get("job_id")), caller)
    return page(ctx, "GPUs", views.gpus_body(ctx, reading, own), active="gpus")


@router.get("/ui/new")
async def new_page(request: Request) -> Response:
    caller = ui_caller(request)
    if caller is None:
        return login_redirect(request)
    ctx = context(request, caller)
    return page(ctx, "New job", template("new.html").substitute(api=esc(ctx.api)), active="new", scripts=("new.js",))


async def _job_parts(request: Request, job_id: str,
                     caller: Caller) -> tuple[dict[str, Any], list[Any], list[Any], dict[str, Any]]:  # fmt: skip
    state = request.app.state
    job = json.loads(await state.training.job_json(job_id, caller))
    checkpoints = (await state.run_control.checkpoints(job_id, caller, 100)).model_dump(mode="json")["checkpoints"]
    events = (await state.training.events(job_id, None, EVENTS_SHOWN, caller)).model_dump(mode="json")["events"]
    found = await artifacts.listing(await state.training.require(job_id, caller), state.settings.OUTPUT_ROOT)
    return job, checkpoints, events, found.model_dump(mode="json")


@router.get("/ui/jobs/{job_id}")
async def job_page(request: Request, job_id: str) -> Response:
    caller = ui_caller(request)
    if caller is None:
        return login_redirect(request)
    ctx = context(request, caller)
    if not JOB_ID_RE.match(job_id):
        return page(ctx, "Job not found", job_view.missing_body(ctx, job_id), status_code=404)
    try:
        job, checkpoints, events, listing = await _job_parts(request, job_id, caller)
    except JobNotFound:
        return page(ctx, "Job not found", job_view.missing_body(ctx, job_id), status_code=404)
    except ApiError as exc:
        return _error_page(ctx, exc, f"Job {job_id}")
    body = job_view.job_body(ctx, job, checkpoints, events, listing)
    return page(ctx, f"Job {job_id}", body, active="jobs", scripts=("vendor/uPlot.iife.min.js", "job.js"))


@router.get("/ui/jobs/{job_id}/files/{path:path}")
async def job_file(request: Request, job_id: str, path: str) -> Response:
    """A job's file (or `<folder>.tar`) for the page's links: a link cannot send the API key, so this reads the
    page's key (the login cookie) like the other pages do; a GET that changes nothing, with Range support."""
    caller = ui_caller(request)
    if caller is None:
        return login_redirect(request)
    state = request.app.state
    try:
        if not JOB_ID_RE.match(job_id):
            raise JobNotFound(job_id)
        job = await state.training.require(job_id, caller)
        # What a job wrote, served from the dashboard's own origin: never run or sniffed as a page.
        return await download_response(
            request,
            job,
            caller,
            path,
            request.headers.get("range"),
            request.headers.get("if-range"),
            {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"},
        )
    except ApiError as exc:
        return Response(exc.detail, status_code=exc.status_code, headers=exc.headers, media_type="text/plain")
