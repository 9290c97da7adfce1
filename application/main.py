"""The API worker: `create_app(settings)`. Stateless: no background task; every request reads and writes the store.

Several workers serve one port (API_WORKERS, see start.py); the scheduler and the runners do everything
that needs GPUs or processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from loguru import logger
from redis.exceptions import RedisError

from application import __version__, http_protocol
from application.api.body_limit import BodyLimit
from application.api.deps import E413
from application.api.errors import install_error_handlers
from application.api.head import HeadAsGet
from application.api.key_first import KeyFirst
from application.api.local_only import LocalOnly
from application.api.metrics import router as metrics_router
from application.api.openapi import TAGS, add_body_limit, add_units, operation_id
from application.api.query_once import QueryOnce
from application.api.response_headers import ResponseHeaders
from application.api.training import include_routes
from application.auth import KeyRing
from application.config import Settings, get_settings
from application.keeper import die_with_parent
from application.services import clock
from application.services.cluster_store import ClusterStore
from application.services.export_control import ExportControl
from application.services.idempotency import Idempotency
from application.services.job_store import JobStore
from application.services.keys import Keys
from application.services.metrics import HttpMetrics, MetricsMiddleware
from application.services.owner_slots import ResponseCut, download_slots, stream_slots
from application.services.queue_service import QueueService
from application.services.redis_service import RedisService, redis_refusal
from application.services.run_control import RunControl
from application.services.streams import Streams
from application.services.system_service import SystemService
from application.services.training_service import TrainingService
from application.ui import mount_ui
from application.utils.log_files import allow_moved_root
from application.utils.logger import OutageLog, setup_logging
from application.utils.process_privacy import keep_private

DESCRIPTION = """
Fine-tuning as a service: submit a job, the server allocates GPUs, queues by priority (0-10, 10 first),
runs the real `swift sft` CLI of ms-swift, follows progress, logs and events, and exports the merged model
with `swift export`. All state lives in Redis.
"""

# A stopping worker gives back the request slots it holds (streams, uploads, downloads) within this, else they
# lapse by themselves.
SLOTS_RELEASE_SECONDS = 2.0


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
    if settings.DIE_WITH_PARENT:  # (a worker start.py started: its own process, exec'd, so dumpable again)
        keep_private()
    logging.getLogger("uvicorn.error").addFilter(_not_a_cut_download)  # (once: a filter is added only once)
    outages = OutageLog()  # (Redis's outages, said once each: at start-up and by the error handlers)

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
        # What start-up built (FastAPI's and pydantic's structures: ~110k objects) lives as long as the worker. Out
        # of the collector's sight, a full collection costs ~4 ms, not 60-450 ms of a stalled loop (hunt DM).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()  # (an app made in a process that goes on: a test's)
            clock.forget()  # (not read again through a closed client)
            with contextlib.suppress(RedisError, TimeoutError):  # (else they lapse by themselves)
                slots = (app.state.streams.slots, app.state.download_slots, training.files.slots)
                await asyncio.wait_for(asyncio.gather(*(s.release_all() for s in slots)), SLOTS_RELEASE_SECONDS)
            await redis_service.close()
            training.checks.close()

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
    app.add_middleware(ResponseHeaders)  # (outermost: the refusals of the others get its headers too)

    install_error_handlers(app, settings, outages)
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
