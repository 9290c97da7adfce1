"""A runner's writes to Redis, kept until Redis takes them: an outage delays what the API shows, loses nothing.

Fields merge (the newest value of each wins), history points and events queue in order and are written once
each: a batch whose reply was lost (Redis went down after taking it) is sent again, and the store skips what it
already took. Field writes are fenced by the run id: when the store refuses one (the job was deleted, or another
run owns it now) the run is no longer this runner's to record, and `Orphaned` says so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from loguru import logger
from redis.exceptions import RedisError

from application.models.training_model import JobStatus
from application.services import clock
from application.services.job_codec import event_payload
from application.services.job_store import SCHEDULER, JobStore, Refusal, TransitionRefused
from application.services.run_record import end_recorded

T = TypeVar("T")

MAX_BACKOFF = 5.0


class Orphaned(Exception):
    """The store refused a write of this run: the job is gone or belongs to another run."""


class Outbox:
    def __init__(self, store: JobStore, job_id: str, run_id: str) -> None:
        self.store = store
        self.job_id = job_id
        self.run_id = run_id
        self.fields: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, str]] = []
        self.sent = (0, 0)  # loss points and events of this run that Redis has taken
        self.failing_since: float | None = None

    def set(self, **fields: Any) -> None:
        self.fields.update(fields)

    def add_history(self, points: list[dict[str, Any]]) -> None:
        self.history.extend(points)

    def event(self, event_type: str, message: str, data: dict[str, Any] | None = None) -> None:
        # Timed now, not when Redis takes it (maybe after an outage).
        self.events.append(event_payload(event_type, message, data, SCHEDULER, clock.now()))

    @property
    def pending(self) -> bool:
        return bool(self.fields or self.history or self.events)

    async def flush(self) -> bool:
        """Write what is waiting; False (everything kept) when Redis does not answer. Raises Orphaned."""
        try:
            if self.fields:
                fields, self.fields = self.fields, {}
                try:
                    await self.store.update(self.job_id, fields, run_id=self.run_id)
                except BaseException:
                    self.fields = {**fields, **self.fields}
                    raise
            if self.history or self.events:
                points, events = len(self.history), len(self.events)  # more may queue while this one is written
                await self.store.append_run(self.job_id, self.run_id, self.history[:points], self.events[:events],
                                            sent=self.sent)  # fmt: skip
                self.sent = (self.sent[0] + points, self.sent[1] + events)
                del self.history[:points], self.events[:events]
        except TransitionRefused as exc:
            raise Orphaned(f"{exc.reason.value}: {exc.current}") from None
        except RedisError as exc:
            if self.failing_since is None:
                self.failing_since = time.monotonic()
                logger.warning("Redis does not answer ({}): keeping the run's updates until it does", exc)
            return False
        if self.failing_since is not None:
            logger.info("Redis answers again after {:.1f} s: updates written", time.monotonic() - self.failing_since)
            self.failing_since = None
        return True

    async def finish(self, status: JobStatus, fields: Mapping[str, Any], message: str,
                     data: Mapping[str, Any] | None = None) -> bool:  # fmt: skip
        """Record the end of the run, retrying until Redis takes it. False when someone else recorded it first."""
        backoff = 0.1
        tried = False
        while True:
            try:
                if not await self.flush():
                    raise RedisError("flush pending")
                await self.store.transition(self.job_id, status, expect=(JobStatus.RUNNING,), fields=fields,
                                            message=message, data=data, run_id=self.run_id)  # fmt: skip
                return True
            except Orphaned:
                return False
            except TransitionRefused as exc:
                if exc.reason == Refusal.BAD_STATE and tried:
                    recorded = await self._recorded(status, fields)
                    if recorded is None:
                        backoff = await retry_later("the end of the run", RedisError("no answer"), backoff)
                        continue
                    if recorded:  # Redis took an earlier try and its answer was lost: the end is ours (its export too)
                        return True
                if exc.reason in (Refusal.BAD_STATE, Refusal.OTHER_RUN, Refusal.MISSING):
                    return False  # ended by someone else (a stop recorded by the scheduler), or deleted
                raise
            except RedisError as exc:
                tried = True
                backoff = await retry_later("the end of the run", exc, backoff)

    async def _recorded(self, status: JobStatus, fields: Mapping[str, Any]) -> bool | None:
        """Whether this end stands recorded (`end_recorded`); None when Redis does not answer."""
        try:
            return await end_recorded(self.store, self.job_id, self.run_id, status, fields)
        except RedisError:
            return None


async def retry_later(what: str, exc: Exception, backoff: float) -> float:
    """Wait out a Redis that did not answer before recording `what` again; the next wait."""
    logger.warning("cannot record {} yet ({}); retrying in {:.1f} s", what, exc, backoff)
    await asyncio.sleep(backoff)
    return min(MAX_BACKOFF, backoff * 2)


async def until_answered(what: str, call: Callable[[], Awaitable[T]]) -> T:
    """`call()` again after each Redis failure, until Redis answers (for writes safe to repeat, or that check
    first whether an earlier try was taken)."""
    backoff = 0.1
    while True:
        try:
            return await call()
        except RedisError as exc:
            backoff = await retry_later(what, exc, backoff)
