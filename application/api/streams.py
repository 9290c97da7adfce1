"""The job streams: Server-Sent Events for a job's log, events and progress (see services/streams.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse
from loguru import logger

from application.api.deps import E404, E429, CallerDep, JobId, Responses, Training
from application.auth import Caller
from application.services.owner_slots import holding
from application.services.redis_service import REDIS_AWAY
from application.services.streams import ServerStopping, Streams

router = APIRouter(tags=["jobs"])

LastEventId = Annotated[
    str | None,
    Header(alias="Last-Event-ID", max_length=64,
           description="resume after this message (sent by EventSource on a reconnect); an id this stream "
                       "never sent is ignored and the stream starts from the beginning (more than 64 "
                       "characters: 422)"),
]  # fmt: skip
SSE: Responses = {200: {"content": {"text/event-stream": {}}, "description": "a stream of Server-Sent Events"}}


async def _streams(request: Request) -> Streams:
    return request.app.state.streams


StreamsDep = Annotated[Streams, Depends(_streams)]


async def _sse(streams: Streams, caller: Caller, gen: AsyncIterator[str]) -> StreamingResponse:
    """The stream, once the caller may open one more (STREAMS_PER_OWNER; 429 otherwise)."""
    slot = await streams.slots.take(caller.name)
    # X-Accel-Buffering: nginx would otherwise hold the messages back until its buffer fills.
    return StreamingResponse(_until_redis_goes(holding(slot, gen)), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip


async def _until_redis_goes(items: AsyncIterator[str]) -> AsyncIterator[str]:
    """`items`, ended whole when Redis stops answering (it was cut mid-chunk, with a traceback per stream) or the
    server stops: the client reconnects with its Last-Event-ID, as after any end but `event: end`, and misses
    nothing."""
    try:
        async for item in items:
            yield item
    except REDIS_AWAY as exc:
        logger.warning("a job stream ends: Redis does not answer ({})", exc)
    except ServerStopping:
        pass


@router.get("/jobs/{job_id}/logs/stream", response_class=StreamingResponse, responses={**SSE, **E404, **E429},
            operation_id="stream_job_logs",
            summary="Follow the log: one message per line (id: byte offset, on across the job's runs; an "
                    "export's: <log>-<offset>)")  # fmt: skip
async def stream_logs(
    job_id: JobId, svc: Training, caller: CallerDep, streams: StreamsDep, last_event_id: LastEventId = None,
    kind: Annotated[Literal["train", "export"], Query(description="the training run's log or the export's")] = "train",
    tail: Annotated[int | None, Query(ge=0, le=100_000, description="start with the current log's last N lines "
                                      "(not the whole log); a reconnect's Last-Event-ID wins")] = None,
) -> StreamingResponse:  # fmt: skip
    """Ends with `event: end` once the job is terminal (for `kind=export`: once the export is no longer running);
    a comment heartbeat every STREAM_HEARTBEAT_SECONDS (15 s) keeps an idle stream open. (Swagger UI's "Try it
    out" shows nothing until the stream ends: follow a running job with `curl -N`, the dashboard or
    `swift-api logs -f`.)"""
    job = await svc.require(job_id, caller)
    return await _sse(streams, caller, streams.logs(job_id, kind, last_event_id, job.created_at, tail))


@router.get("/jobs/{job_id}/events/stream", response_class=StreamingResponse, responses={**SSE, **E404, **E429},
            operation_id="stream_job_events", summary="Follow the events (id: the event id)")  # fmt: skip
async def stream_events(job_id: JobId, svc: Training, caller: CallerDep, streams: StreamsDep,
                        last_event_id: LastEventId = None) -> StreamingResponse:  # fmt: skip
    """Each message: one event of GET .../events (type, message, time, actor, data). Ends with `event: end` once
    the job is terminal. (Swagger UI shows nothing until the stream ends: use `curl -N` to follow it.)"""
    job = await svc.require(job_id, caller)
    return await _sse(streams, caller, streams.events(job_id, last_event_id, job.created_at))


@router.get("/jobs/{job_id}/progress/stream", response_class=StreamingResponse, responses={**SSE, **E404, **E429},
            operation_id="stream_job_progress",
            summary="Follow the progress: one message per loss point (id: <run>.<step>-<k>)")  # fmt: skip
async def stream_progress(job_id: JobId, svc: Training, caller: CallerDep, streams: StreamsDep,
                          last_event_id: LastEventId = None) -> StreamingResponse:  # fmt: skip
    """Each message: the history point (step, loss, eval_loss, learning_rate, grad_norm, epoch, time) and
    `progress` (current_step, max_steps, remaining_seconds, ...). Ends with `event: end` once the job is terminal
    (Swagger UI shows nothing until then: use `curl -N` to follow it)."""
    job = await svc.require(job_id, caller)
    return await _sse(streams, caller, streams.progress(job_id, last_event_id, job.created_at))
