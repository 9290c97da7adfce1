"""Writes whose reply was lost: Redis busy past REDIS_SOCKET_TIMEOUT (then running what it had read), or a
connection dropped after Redis ran the command. They may have been made all the same. The client sends neither
again (`redis_service.RetryUnsent`), so what a write was to make is looked for before anyone is told to try
again, whose retry would make it twice. The writes also take a second run of their own script for the first
(`own_create`, STORE_FILE): redis-py sent a dropped connection's command again until ReplyLost, and a client
of another make may still."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from application.exceptions import Unavailable
from application.models.training_model import Job, JobStatus
from application.services.job_store import JobStore

LOOK_SECONDS = 10.0
# Redis may take the look before the write it had read from the connection given up on: a second look after this.
SETTLE_SECONDS = 0.5


class MaybeMade(Unavailable):
    """503 for a write that may have been made (its reply lost, and Redis away since): what it made is kept."""


async def negated(check: Awaitable[bool]) -> bool:
    return not await check


def never_sent(error: Exception) -> bool:
    """A connection that could not be made (redis-py's words for it): the write cannot have reached Redis."""
    return "connecting" in str(error)


async def landed(made: Callable[[], Awaitable[bool]], seconds: float = LOOK_SECONDS) -> bool | None:
    """Whether the write is there, as read once Redis answers again; None when it did not answer within `seconds`
    (each look too: one look may otherwise wait out a socket timeout and every reconnect)."""
    deadline = time.monotonic() + seconds
    looks = 0
    while True:
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                found = await made()
            if found:
                return True
            looks += 1
            if looks == 2:
                return False
            await asyncio.sleep(SETTLE_SECONDS)
        except (RedisError, TimeoutError):  # (a busy Redis's BUSY too: no answer yet)
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.2)


async def own_create(store: JobStore, job: Job) -> bool:
    """The job stored under this id is the one this create made (its script run twice: a reply lost on a dropped
    connection, sent again)."""
    return bool(await store.get_field(job.job_id, "created_at") == job.created_at)


async def created_anyway(store: JobStore, job: Job, lost: Exception) -> int | None:
    """After a create whose reply was lost: the job's queue position (None when not queued) when it was stored;
    else `lost` is raised again (nothing was stored: try again is true), or a 503 that says it may have been."""
    if never_sent(lost):
        raise lost
    found = await landed(lambda: own_create(store, job))
    if found is None:
        look = f"look (GET .../jobs/{job.job_id}) before creating it again"
        raise MaybeMade(f"Redis did not answer in time: job '{job.job_id}' may have been created; {look}",
                        {"Retry-After": "5"}) from lost  # fmt: skip
    if not found:  # looked for, twice: certainly not made, and a retry (with its key too) may make it
        raise Unavailable(f"Redis did not answer ({lost}): job '{job.job_id}' was not created; try again",
                          {"Retry-After": "5"}) from lost  # fmt: skip
    return await store.queue_position(job.job_id) if job.status == JobStatus.QUEUED else None
