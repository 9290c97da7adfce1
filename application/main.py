"""The API worker: `create_app(settings)`. Stateless: no background task; every request reads and writes the store.

Several workers serve one port (API_WORKERS, see start.py); the scheduler and the runners do everything
that needs GPUs or processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from loguru import logger
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from application import __version__, http_protocol
from application.api.body_limit import BodyLimit
from application.api.deps import E413
from application.api.head import HeadAsGet
from application.api.key_first import KeyFirst
from application.api.local_only import LocalOnly
from application.api.metrics import router as metrics_router
from application.api.openapi import TAGS, add_body_limit, add_units, operation_id
from application.api.query_once import QueryOnce
from application.api.route_path import route_path
from application.api.training import include_routes
from application.auth import KeyRing
from application.config import Settings, get_settings
from application.exceptions import ApiError, error_json
from application.models.file_model import FILE_ID_HELP
from application.models.job_request import JOB_ID_HELP
from application.services import clock
from application.services.cluster_store import ClusterStore
from application.services.export_control import ExportControl
from application.services.idempotency import Idempotency
from application.services.job_store import JobStore
from application.services.keys import Keys
from application.services.metrics import HttpMetrics, MetricsMiddleware
from application.services.owner_slots import ResponseCut, download_slots, stream_slots
from application.services.queue_service import QueueService
from application.services.redis_service import (
    RedisService,
    die_with_parent,
    lost_reply_detail,
    may_have_run,
    redis_refusal,
)
from application.services.run_control import RunControl
from application.services.streams import Streams
from application.services.system_service import SystemService
from application.services.training_service import TrainingService
from application.ui import mount_ui
from application.utils.log_files import allow_moved_root
from application.utils.logger import OutageLog, setup_logging

DESCRIPTION = """
Fine-tuning as a service: submit a job, the server allocates GPUs, queues by priority (0-10, 10 first),
runs the real `swift sft` CLI of ms-swift, follows progress, logs and events, and exports the merged model
with `swift export`. All state lives in Redis.
"""

# A stopping worker gives back the request slots it holds (streams, uploads, downloads) within this, else they
# lapse by themselves.
SLOTS_RELEASE_SECONDS = 2.0


class ErrorResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return error_json(content)


# The refusals a 422 lists: a body of 60,000 unknown keys (1 MB) was answered with each, twice (9 MB).
ERRORS_SHOWN = 20


# What a query, path or header value that does not match its pattern should be, in words: the regex was the
# message, and a bad cursor never reached parse_cursor's plain one (hunt CJ).
PATTERN_WORDS = {
    "cursor": "not one this server gave: pass a page's next_cursor as it came",
    "after": "not an event id: pass the id of the last event already seen, as it came (such as 1733450000000-0)",
    "owner": "an owner's name is 1-64 characters: letters, digits, '_', '.', '-'",
    "job_id": f"not a job id: {JOB_ID_HELP}",
    "file_id": f"not a file id: {FILE_ID_HELP}",
    "Idempotency-Key": "1-255 printable ASCII characters, no spaces: a key of your own per request (a UUID)",
}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    errors = exc.errors()
    for err in errors[:ERRORS_SHOWN]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        given = err.get("input")
        if isinstance(given, float) and not math.isfinite(given):
            msg = f"{given} is not a number this field takes: send a finite number"
        elif err.get("type") == "string_pattern_mismatch" and (words := _pattern_words(err.get("loc", ()))):
            msg = words
        elif err.get("type") == "extra_forbidden":
            msg = "unknown field: remove it (see the schema at /docs)"
        elif err.get("type") == "json_invalid":
            where = err.get("loc", ("body", None))[-1]
            reason = (err.get("ctx") or {}).get("error", "not JSON")
            loc, msg = "body", f"not valid JSON ({reason}, at character {where}): send one JSON object"
        elif err.get("type") in ("model_attributes_type", "dict_type") and tuple(err.get("loc", ())) == ("body",):
            # What curl -d sends without -H: form-encoded text, never read as JSON.
            msg = "send one JSON object, with the header Content-Type: application/json"
        parts.append(f"{loc}: {msg}")
    if len(errors) > ERRORS_SHOWN:
        parts.append(f"and {len(errors) - ERRORS_SHOWN} more")
    return "; ".join(parts)


def _pattern_words(loc: tuple[Any, ...] | list[Any]) -> str | None:
    return PATTERN_WORDS.get(str(loc[-1])) if len(loc) == 2 and loc[0] in ("query", "path", "header") else None


def _without_script(exc: Exception) -> str:
    """Redis's error less the script's hash and line ("script: cd3c1c…, on @user_script:9."): our internals, of no
    use to a caller (hunt CI)."""
    return re.sub(r"\s*script: [0-9a-f]{40}, on @user_script:\d+\.?", "", str(exc)).strip() or str(exc)


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods of the resource at `path`, as the published schema lists them.

    The most specific documented path wins: /queue/process is its own resource, although /queue/{job_id}
    also matches it. Paths outside the schema fall back to what the routes answer.
    """
    matching: list[tuple[int, list[str]]] = []
    for template, ops in app.openapi()["paths"].items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            matching.append((template.count("{"), sorted(m.upper() for m in ops)))
    if matching:
        fewest = min(n for n, _ in matching)
        return sorted({m for n, methods in matching if n == fewest for m in methods})
    allowed: list[str] = []
    for method in _METHODS:
        scope = {"type": "http", "path": path, "method": method, "root_path": "", "headers": []}
        if any(route.matches(scope)[0] == Match.FULL for route in app.router.routes):
            allowed.append(method)
    return allowed


async def _build_routes(app: FastAPI) -> None:
    """FastAPI builds an included router's route table on the first request that reaches it (most of a second
    on a small machine, for every worker): built now, before the worker is ready, no user waits for it."""
    scope = {"type": "http", "method": "GET", "path": "/-/no-route", "raw_path": b"/-/no-route", "root_path": "",
             "query_string": b"", "headers": []}  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(_: Any) -> None:
        pass

    await app.router(scope, receive, send)


def _not_a_cut_download(record: logging.LogRecord) -> bool:
    """False for uvicorn's "Exception in ASGI application" of a download cut on purpose (said in one line where
    it was cut): the exception is how the connection gets dropped, not a fault."""
    return not (record.exc_info and isinstance(record.exc_info[1], ResponseCut))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logging.getLogger("uvicorn.error").addFilter(_not_a_cut_download)  # (once: a filter is added only once)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        setup_logging(settings.LOG_LEVEL, settings.LOG_DIR)
        if settings.DIE_WITH_PARENT:
            die_with_parent()
        redis_service = RedisService(settings)
        client = await redis_service.connect()
        await clock.sync(client)  # (Redis not answering yet: this host's clock until it does)
        keys = Keys(settings.REDIS_KEY_PREFIX)
        store = JobStore(client, keys, events_max=settings.EVENTS_MAX_PER_JOB, history_max=settings.LOSS_HISTORY_LIMIT)
        cluster = ClusterStore(client, keys)
        training = TrainingService(settings, store, cluster)
        app.state.settings = settings
        app.state.redis = redis_service
        app.state.idempotency = Idempotency(cluster)
        app.state.training = training
        app.state.queue = QueueService(training)
        app.state.run_control = RunControl(training)
        app.state.exports = ExportControl(training)
        app.state.download_slots = download_slots(store.r, store.keys, settings)
        app.state.streams = Streams(
            store,
            stream_slots(store.r, store.keys, settings),
            poll=settings.STREAM_POLL_SECONDS,
            heartbeat=settings.STREAM_HEARTBEAT_SECONDS,
        )
        app.state.system = SystemService(training, redis_service)
        app.state.files = training.files
        settings.OUTPUT_ROOT.mkdir(parents=True, exist_ok=True)
        for root in (*settings.data_roots(), *settings.model_roots()):
            try:
                root.mkdir(parents=True, exist_ok=True)  # where users put their files; may be a read-only mount
            except OSError:
                pass
        await _build_routes(app)
        # The address too: uvicorn's own "running on" line is off (log_config=None), and the port may be any.
        host = settings.bind_host
        shown = f"[{host}]" if ":" in host else host
        behind = f" (behind a proxy at {settings.ROOT_PATH})" if settings.ROOT_PATH else ""
        logger.info("swift-api {} API worker {} ready on http://{}:{}{}: API under {}/training, Swagger at /docs",
                    __version__, os.getpid(), shown, settings.APP_PORT, behind, settings.API_PREFIX)  # fmt: skip
        try:  # (it serves all the same, and outlasts the outage: "ready" alone hid it)
            await asyncio.wait_for(client.ping(), 2)
        except Exception as exc:
            why = (
                redis_refusal(exc, settings.REDIS_KEY_PREFIX)
                or f"Redis does not answer yet ({str(exc) or type(exc).__name__})"
            )
            outages.seen(exc, f"{why}: requests are answered 503 until it does")
        try:
            yield
        finally:
            clock.forget()  # (not read again through a closed client)
            with contextlib.suppress(RedisError, TimeoutError):  # (else they lapse by themselves)
                slots = (app.state.streams.slots, app.state.download_slots, training.files.slots)
                await asyncio.wait_for(asyncio.gather(*(s.release_all() for s in slots)), SLOTS_RELEASE_SECONDS)
            await redis_service.close()

    app = FastAPI(title="swift-api", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_tags=TAGS,
                  generate_unique_id_function=operation_id)  # fmt: skip
    app.state.keys = KeyRing(settings.api_keys)
    http_protocol.configure(settings)  # (in each worker, whose uvicorn takes the protocol class by its name)
    allow_moved_root(settings.OUTPUT_ROOT)
    app.state.http_metrics = HttpMetrics()
    # Uploads stream to disk under their own limit (FILE_MAX_BYTES, enforced while reading: services/upload_stream).
    unlimited = {("POST", f"{settings.API_PREFIX}/training/files")}
    app.add_middleware(HeadAsGet)
    app.add_middleware(BodyLimit, max_bytes=settings.MAX_REQUEST_BYTES, exempt=unlimited)
    app.add_middleware(QueryOnce)
    app.add_middleware(KeyFirst, api_root=f"{settings.API_PREFIX}/training")  # (before BodyLimit reads a body)
    app.add_middleware(MetricsMiddleware, metrics=app.state.http_metrics)
    if not settings.api_keys and not settings.ALLOW_UNAUTHENTICATED:
        app.add_middleware(LocalOnly)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return ErrorResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors: list[dict[str, Any]] = [
            {"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())], "msg": str(e.get("msg")),
             "type": str(e.get("type"))}
            for e in exc.errors()[:ERRORS_SHOWN]
        ]  # fmt: skip
        return ErrorResponse({"detail": _validation_message(exc), "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the methods of the first route that matched the path; list them all.
            headers["Allow"] = ", ".join(_allowed_methods(app, route_path(request.scope, settings.ROOT_PATH)))
        detail = str(exc.detail)
        if exc.status_code == 400 and isinstance(exc.__cause__, (RecursionError, ValueError)):
            # FastAPI's "There was an error parsing the body": JSON its parser gave up on, said plainly.
            cause = exc.__cause__
            why = str(cause)[:100]
            if isinstance(cause, RecursionError):
                why = "nested too deeply"
            elif isinstance(cause, UnicodeDecodeError):  # (JSON is UTF-8, whatever charset a Content-Type names)
                why = f"byte {cause.start} is not UTF-8: JSON is sent as UTF-8, whatever charset it declares"
            elif "digits" in why:
                why = "a number with more than 4300 digits"
            detail = f"body: not JSON this server can read ({why}): send one JSON object"
        path = route_path(request.scope, settings.ROOT_PATH)
        if exc.status_code == 404 and detail == "Not Found" and not path.startswith("/static/"):
            # No route has the path: "curl host:8000/health" got a bare "Not Found" (hunt BM). Still "Not Found"
            # first, which clients (the CLI) tell a wrong URL by.
            root = settings.ROOT_PATH  # (behind a proxy at a sub-path)
            api = f"{root}{settings.API_PREFIX}/training"
            detail = (f"Not Found: no route answers {request.method} {request.url.path[:200]}; this server's API is "
                      f"under {api} (its health: {api}/health), and {root}/docs lists its routes")  # fmt: skip
        return ErrorResponse({"detail": detail}, status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _: ClientDisconnect) -> Response:
        # The client hung up mid-body (a cut upload): what was received is already cleaned up; a traceback
        # logged as an error for each would let any client fill the logs.
        logger.info("{} {}: the client disconnected before its request body ended", request.method, request.url.path)
        return Response(status_code=400)

    outages = OutageLog()

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        # (a wrong password is a ConnectionError to redis-py: not one to wait out)
        refused = redis_refusal(exc, settings.REDIS_KEY_PREFIX)
        # The operator's to see (these were INFO access lines alone); the error's text, with Redis's address, is
        # not the caller's.
        outages.seen(exc, f"requests answered 503: {refused or f'Redis does not answer ({exc})'}")
        if refused:
            return JSONResponse({"detail": "this server cannot use its Redis (its operator's setup: see the server's "
                                           "log): try again later"}, status_code=503)  # fmt: skip
        if request.method not in ("GET", "HEAD") and may_have_run(exc):
            # Sent, and its answer lost: "try again" would do it twice, or be refused for what it already did (no
            # Retry-After, as an Idempotency-Key's kept answer has none).
            return JSONResponse({"detail": lost_reply_detail(request.method, exc)}, status_code=503)
        return JSONResponse({"detail": "Redis does not answer; try again when it is back"}, status_code=503,
                            headers={"Retry-After": "5"})  # fmt: skip

    @app.exception_handler(OSError)
    async def _out_of_files(_: Request, exc: OSError) -> JSONResponse:
        # A worker at its limit on open files failed wherever a request opened one (/proc for /system/status):
        # a bare 500 with a traceback, for what is the load of the moment (hunt BY). Any other stays a 500.
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise exc
        outages.seen(exc, f"requests answered 503: this API worker has run out of open files ({exc})")
        return ErrorResponse({"detail": "the server has too many connections open right now: try again shortly"},
                             status_code=503, headers={"Retry-After": "5"})  # fmt: skip

    @app.exception_handler(RedisError)
    async def _redis_error(_: Request, exc: Exception) -> JSONResponse:
        # e.g. a read-only replica or OOM: the store cannot take the change now
        refused = redis_refusal(exc, settings.REDIS_KEY_PREFIX)
        outages.seen(exc, f"requests answered 503: {refused or f'Redis refused an operation ({exc})'}")
        detail = "this server cannot use its Redis (its operator's setup: see the server's log): try again later" \
            if refused else f"Redis refused the operation ({_without_script(exc)})"  # fmt: skip
        return JSONResponse({"detail": detail}, status_code=503)

    include_routes(app, settings.API_PREFIX)
    app.include_router(metrics_router)
    mount_ui(app)
    plain_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = add_body_limit(add_units(plain_openapi()), unlimited, E413[413]["description"])
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
