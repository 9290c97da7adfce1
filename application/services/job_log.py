"""A job's events (a Redis stream) and loss history (a list), the part of the store a run's runner writes most.

`JobStore` extends this class: callers use the store. Writes go through Lua scripts that check the job still
exists (a deleted job gets no new keys) and, for a runner, that it writes into its own run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis

from application.models.training_model import Event, LossPoint
from application.services import clock, lua_log
from application.services.job_codec import encode, event_payload, script_arg
from application.services.keys import Keys
from application.services.refusals import TransitionRefused

SCHEDULER = "scheduler"


def dropped_note(oldest: str) -> str:
    return (f"older events were dropped (EVENTS_MAX_PER_JOB keeps the newest): the oldest kept is {oldest}, and "
            "some before it, after the point asked for, are gone")  # fmt: skip


def event_order(event_id: str) -> tuple[int, int]:
    """A Redis stream id as Redis orders them (by number, not as text)."""
    ms, _, seq = event_id.partition("-")
    return (int(ms), int(seq))


class JobLog:
    def __init__(self, client: aioredis.Redis, keys: Keys, *, events_max: int = 1000, history_max: int = 2000):
        # redis-py types replies as bytes|str unions even with decode_responses=True: treat them as str.
        self.r: Any = client
        self.keys = keys
        self.events_max = events_max
        self.history_max = history_max
        self._run_append = client.register_script(lua_log.RUN_APPEND)
        self._append = client.register_script(lua_log.APPEND)

    async def add_event(self, job_id: str, event_type: str, message: str, data: Mapping[str, Any] | None = None,
                        *, actor: str = SCHEDULER) -> None:  # fmt: skip
        """An event written by someone other than the run's runner; none once the job is deleted."""
        await self._append_guarded(job_id, event=event_payload(event_type, message, data, actor, clock.now()))

    async def add_event_once(self, job_id: str, event_type: str, message: str,
                             data: Mapping[str, Any] | None = None, *, since: str | None) -> None:  # fmt: skip
        """`add_event`, unless one of this type and message was written after the event `since`: for a write
        tried again after Redis lost a try's reply (the `retry` event of a requeued run was listed twice)."""
        if any(e.type == event_type and e.message == message for e in await self.events(job_id, since, 50)):
            return
        await self.add_event(job_id, event_type, message, data)

    async def _append_guarded(self, job_id: str, *, event: Mapping[str, str] | None = None,
                              history: Sequence[str] | None = None, replace: bool = False) -> None:  # fmt: skip
        k = self.keys
        await self._append(keys=[k.job(job_id)], args=[script_arg({
            "event": event, "history": history, "replace": replace or None, "maxlen": self.events_max,
            "history_max": self.history_max, "k": {"events": k.job_events(job_id), "history": k.job_history(job_id)},
        })])  # fmt: skip

    async def events(self, job_id: str, after: str | None, limit: int) -> list[Event]:
        return (await self.events_page(job_id, after, limit))[0]

    async def events_page(self, job_id: str, after: str | None, limit: int) -> tuple[list[Event], str | None]:
        """Up to `limit` events after `after` (None: from the start), and `events_dropped` for that read, read
        together (apart, a trim in between said the page's own first events were dropped)."""
        key = self.keys.job_events(job_id)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.xrange(key, min=f"({after}" if after else "-", max="+", count=limit)
            pipe.xrange(key, min="-", max="+", count=1)
            pipe.xlen(key)
            rows, first, length = await pipe.execute()
        events = [
            Event(id=eid, time=float(f.get("time", 0)), type=f.get("type", ""), message=f.get("message", ""),
                  actor=f.get("actor"), data=json.loads(f.get("data") or "{}"))
            for eid, f in rows
        ]  # fmt: skip
        return events, self._dropped(first, int(length), after)

    async def events_dropped(self, job_id: str, after: str | None) -> str | None:
        """The oldest event kept, when events a read from `after` (None: from the start) would have listed were
        dropped: EVENTS_MAX_PER_JOB keeps the newest. A drop that ended exactly at `after` reads as one too (Redis
        6.2 keeps no count of what a stream dropped)."""
        key = self.keys.job_events(job_id)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.xrange(key, min="-", max="+", count=1)
            pipe.xlen(key)
            first, length = await pipe.execute()
        return self._dropped(first, int(length), after)

    def _dropped(self, first: list[Any], length: int, after: str | None) -> str | None:
        # Trimmed only at EVENTS_MAX_PER_JOB (in whole blocks: what is kept is never fewer): a shorter stream
        # whose first event is not 'created' is one a version before 3ddb2e2 left under a reused id, not a drop.
        if not first or length < self.events_max or first[0][1].get("type") == "created":
            return None
        oldest: str = first[0][0]
        return oldest if after is None or event_order(after) < event_order(oldest) else None

    async def newest_event_id(self, job_id: str) -> str | None:
        rows = await self.r.xrevrange(self.keys.job_events(job_id), max="+", min="-", count=1)
        return rows[0][0] if rows else None

    async def append_run(self, job_id: str, run_id: str, history: Sequence[Mapping[str, Any]],
                         events: Sequence[Mapping[str, str]], *, sent: tuple[int, int]) -> None:  # fmt: skip
        """A runner's loss points and events (`event_payload`s). `sent`: how many of each this run had written
        before these; what Redis already took (a reply lost in an outage, the batch sent again) is skipped."""
        k = self.keys
        res = await self._run_append(keys=[k.job(job_id)], args=[script_arg({
            "run_id": run_id, "h_from": sent[0], "e_from": sent[1], "history": [encode(p) for p in history],
            "events": list(events), "maxlen": self.events_max, "history_max": self.history_max,
            "k": {"history": k.job_history(job_id), "events": k.job_events(job_id), "sent": k.job_sent(job_id)},
        })])  # fmt: skip
        if res[0] != "ok":
            raise TransitionRefused.from_reply(res)

    async def add_history(self, job_id: str, points: Sequence[Mapping[str, Any]]) -> None:
        """Loss points written by someone other than the run's runner (the watchdog, from logging.jsonl, for a
        runner that died), capped as a runner's are; none once the job is deleted."""
        await self._append_guarded(job_id, history=[encode(p) for p in points])

    async def trim_history(self, job_id: str, up_to_step: int | None) -> None:
        """Drop the loss points after `up_to_step` (all of them for None): a resumed run logs those steps again.
        Only while no run of the job writes (it is about to start one)."""
        kept = []
        if up_to_step is not None:
            raws = await self.r.lrange(self.keys.job_history(job_id), 0, -1)
            kept = [raw for raw in raws if json.loads(raw).get("step", 0) <= up_to_step]
        await self._append_guarded(job_id, history=kept, replace=True)

    async def history_marker(self, job_id: str) -> tuple[int, str | None]:
        """The loss history's length and newest point, raw: what changes whenever a point is added."""
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.llen(self.keys.job_history(job_id))
            pipe.lindex(self.keys.job_history(job_id), -1)
            length, newest = await pipe.execute()
        return int(length), newest

    async def history(self, job_id: str, limit: int) -> list[LossPoint]:
        if limit <= 0:
            return []
        raw = await self.r.lrange(self.keys.job_history(job_id), -limit, -1)
        return [LossPoint.model_validate_json(x) for x in raw]
