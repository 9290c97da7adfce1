"""Jobs, events, loss history, the queue and GPU leases in Redis.

A job is a hash with one field per top-level `Job` field, each JSON-encoded, so writers of different
fields (the supervisor's progress, the API's priority change) never overwrite each other. Every status
change goes through `transition`, one Lua script that refuses illegal moves (and any move out of a
terminal state), stamps times, keeps the status indexes, the queue and the GPU leases in step, and
appends the event.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from application.exceptions import Conflict, JobNotFound
from application.models.training_model import (
    ALLOWED_TRANSITIONS,
    Event,
    ExportStatus,
    Job,
    JobStatus,
    LossPoint,
)
from application.services import lua
from application.services.keys import Keys
from application.services.scheduler import queue_score

STATUS_ORDER = [s.value for s in JobStatus]
STATUS_LIST_JSON = json.dumps(STATUS_ORDER)


def encode_fields(fields: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in fields.items():
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        elif hasattr(value, "value") and isinstance(value, JobStatus | ExportStatus):
            value = value.value
        out[name] = json.dumps(value, separators=(",", ":"))
    return out


def decode_job(raw: Mapping[str, str]) -> Job:
    return Job.model_validate({k: json.loads(v) for k, v in raw.items()})


def _event_json(event_type: str, message: str, data: Mapping[str, Any] | None, now: float) -> str:
    return json.dumps({"type": event_type, "message": message, "time": repr(now), "data": json.dumps(dict(data or {}))})


@dataclass(frozen=True)
class QueueMeta:
    """What the scheduler needs of a queued job, kept beside the queue so a pass reads no job hashes."""

    priority: int
    submitted_at: float
    num_gpus: int
    gpu_ids: list[int] | None
    min_gpu_memory_gb: float | None
    estimated_duration: float | None = None

    def encode(self) -> str:
        return json.dumps(
            [self.priority, self.submitted_at, self.num_gpus, self.gpu_ids, self.min_gpu_memory_gb,
             self.estimated_duration],
            separators=(",", ":"),
        )  # fmt: skip

    @classmethod
    def decode(cls, raw: str) -> QueueMeta:
        p, t, n, ids, mem, est = json.loads(raw)
        return cls(p, t, n, ids, mem, est)

    @classmethod
    def of(cls, job: Job) -> QueueMeta:
        return cls(job.priority, job.created_at, job.num_gpus, job.gpu_ids_requested, job.min_gpu_memory_gb)


class TransitionRefused(Exception):
    def __init__(self, reason: str, current: str | None = None, detail: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.current = current
        self.detail = detail


class JobStore:
    def __init__(self, client: aioredis.Redis, keys: Keys, *, events_max: int = 1000, history_max: int = 2000):
        # redis-py types replies as bytes|str unions even with decode_responses=True: treat them as str.
        self.r: Any = client
        self.keys = keys
        self.events_max = events_max
        self.history_max = history_max
        self._create = client.register_script(lua.CREATE)
        self._transition = client.register_script(lua.TRANSITION)
        self._guarded = client.register_script(lua.GUARDED_UPDATE)
        self._delete = client.register_script(lua.DELETE)
        self._reprioritize = client.register_script(lua.REPRIORITIZE)

    # ---- jobs -------------------------------------------------------------------------------------------

    async def create(self, job: Job, *, message: str) -> None:
        """Store a new job; raises `TransitionRefused('exists')` or `('output_dir_busy', holder)`."""
        k = self.keys
        queued = job.status == JobStatus.QUEUED
        fields = encode_fields(job.model_dump())
        res = await self._create(
            keys=[k.job(job.job_id), k.jobs_index, k.job_events(job.job_id), k.output_dirs, k.queue,
                  k.queue_meta, k.wakeup_channel, *k.all_status_indexes()],
            args=[job.job_id, json.dumps(fields), repr(job.created_at), job.status.value, job.output_dir,
                  repr(queue_score(job.priority, job.created_at)) if queued else "",
                  QueueMeta.of(job).encode(), _event_json("created", message, {"status": job.status.value,
                  "priority": job.priority}, job.created_at), self.events_max, STATUS_LIST_JSON],
        )  # fmt: skip
        if res[0] != "ok":
            raise TransitionRefused(res[0], detail=res[1] if len(res) > 1 else None)

    async def get(self, job_id: str) -> Job | None:
        raw = await self.r.hgetall(self.keys.job(job_id))
        return decode_job(raw) if raw else None

    async def require(self, job_id: str) -> Job:
        job = await self.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    async def get_many(self, job_ids: Iterable[str]) -> list[Job]:
        ids = list(job_ids)
        if not ids:
            return []
        async with self.r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self.keys.job(job_id))
            raws = await pipe.execute()
        return [decode_job(raw) for raw in raws if raw]

    async def get_field(self, job_id: str, name: str) -> Any:
        raw = await self.r.hget(self.keys.job(job_id), name)
        return None if raw is None else json.loads(raw)

    async def page(self, status: JobStatus | None, offset: int, limit: int) -> tuple[list[Job], int]:
        index = self.keys.status_index(status) if status else self.keys.jobs_index
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.zcard(index)
            pipe.zrevrange(index, offset, offset + limit - 1)
            total, ids = await pipe.execute()
        return await self.get_many(ids), int(total)

    async def counts(self) -> dict[str, int]:
        async with self.r.pipeline(transaction=False) as pipe:
            for s in JobStatus:
                pipe.zcard(self.keys.status_index(s))
            values = await pipe.execute()
        return {s.value: int(v) for s, v in zip(JobStatus, values, strict=True)}

    async def ids_with_status(self, *statuses: JobStatus) -> list[str]:
        async with self.r.pipeline(transaction=False) as pipe:
            for s in statuses:
                pipe.zrange(self.keys.status_index(s), 0, -1)
            lists = await pipe.execute()
        return [job_id for ids in lists for job_id in ids]

    async def update(
        self,
        job_id: str,
        fields: Mapping[str, Any],
        *,
        statuses: Iterable[JobStatus] | None = None,
        refuse_export: Iterable[ExportStatus] | None = None,
        event: tuple[str, str, Mapping[str, Any] | None] | None = None,
        owner: str | None = None,
        run_id: str | None = None,
    ) -> str:
        """Set fields only if the job still exists (and is in `statuses`, its export not in `refuse_export`).

        Returns the job's status; raises TransitionRefused otherwise. A deleted job is never recreated.
        """
        now = time.time()
        enc = encode_fields({**fields, "updated_at": now})
        res = await self._guarded(
            keys=[self.keys.job(job_id), self.keys.job_events(job_id)],
            args=[json.dumps(enc),
                  json.dumps([s.value for s in statuses]) if statuses is not None else "",
                  json.dumps([s.value for s in refuse_export]) if refuse_export is not None else "",
                  _event_json(event[0], event[1], event[2], now) if event else "",
                  self.events_max, owner or "", run_id or ""],
        )  # fmt: skip
        if res[0] != "ok":
            raise TransitionRefused(res[0], current=res[1] if len(res) > 1 else None)
        return str(res[1])

    async def transition(
        self,
        job_id: str,
        to: JobStatus,
        *,
        expect: Iterable[JobStatus] | None = None,
        fields: Mapping[str, Any] | None = None,
        message: str = "",
        data: Mapping[str, Any] | None = None,
        acquire_gpus: Iterable[int] = (),
        owner: str | None = None,
        run_id: str | None = None,
        now: float | None = None,
    ) -> JobStatus:
        """The one way a job's status changes. Returns the previous status.

        Refuses (TransitionRefused) a move not in ALLOWED_TRANSITIONS — so never out of a terminal state —
        or from a status outside `expect`, or onto a GPU another job leases. Stamps queued/started/finished
        times, keeps queue and leases consistent (a job leaving `running` releases its GPUs; one leaving the
        queue leaves the queue set) and wakes the queue processors when GPUs or the queue change.
        """
        now = time.time() if now is None else now
        allowed = {s for s, targets in ALLOWED_TRANSITIONS.items() if to in targets}
        if expect is not None:
            allowed &= set(expect)
        extra: dict[str, Any] = dict(fields or {})
        extra["updated_at"] = now
        queue_op = ""
        meta = ""
        if to == JobStatus.QUEUED:
            extra.setdefault("queued_at", now)
            job = await self.require(job_id)
            queue_op, meta = "add", QueueMeta.of(job).encode()  # the script re-reads the priority
        elif to == JobStatus.RUNNING:
            extra.setdefault("started_at", now)
            queue_op = "remove"
        else:
            queue_op = "remove"
        if to.is_terminal():
            extra.setdefault("finished_at", now)
        release = to.is_terminal()
        wake = to in (JobStatus.QUEUED,) or to.is_terminal()
        k = self.keys
        res = await self._transition(
            keys=[k.job(job_id), k.job_events(job_id), k.output_dirs, k.queue, k.queue_meta, k.gpu_leases,
                  k.wakeup_channel, *k.all_status_indexes()],
            args=[job_id, json.dumps(to.value), json.dumps(sorted(s.value for s in allowed)),
                  json.dumps(encode_fields(extra)), "", queue_op, "", meta,
                  json.dumps(list(acquire_gpus)), "1" if release else "0", "1" if to.is_terminal() else "0",
                  _event_json(f"status_{to.value}", message or f"status changed to {to.value}",
                              {"status": to.value, **(data or {})}, now),
                  self.events_max, STATUS_LIST_JSON, "1" if wake else "0", owner or "", run_id or ""],
        )  # fmt: skip
        if res[0] != "ok":
            raise TransitionRefused(res[0], current=res[1] if len(res) > 1 else None,
                                    detail=res[2] if len(res) > 2 else None)  # fmt: skip
        return JobStatus(res[1])

    async def delete(self, job_id: str) -> JobStatus:
        k = self.keys
        res = await self._delete(
            keys=[k.job(job_id), k.jobs_index, k.job_events(job_id), k.job_history(job_id), k.output_dirs,
                  k.queue, k.queue_meta, k.gpu_leases, *k.all_status_indexes()],
            args=[job_id, json.dumps([JobStatus.RUNNING.value]), STATUS_LIST_JSON],
        )  # fmt: skip
        if res[0] == "missing":
            raise JobNotFound(job_id)
        if res[0] == "bad_state":
            raise Conflict(f"job '{job_id}' is running: stop it first (POST .../jobs/{job_id}/stop), then delete it")
        if res[0] == "export_state":
            raise Conflict(f"job '{job_id}' is exporting its model: wait for the export to end, then delete it")
        return JobStatus(res[1])

    async def reprioritize(self, job: Job, priority: int) -> JobStatus:
        now = time.time()
        meta = QueueMeta(priority, job.created_at, job.num_gpus, job.gpu_ids_requested, job.min_gpu_memory_gb)
        k = self.keys
        res = await self._reprioritize(
            keys=[k.job(job.job_id), k.queue, k.queue_meta, k.job_events(job.job_id), k.wakeup_channel],
            args=[job.job_id, json.dumps(priority), repr(queue_score(priority, job.created_at)), meta.encode(),
                  _event_json("priority_changed", f"priority changed from {job.priority} to {priority}",
                              {"from": job.priority, "to": priority}, now),
                  self.events_max, json.dumps(now)],
        )  # fmt: skip
        if res[0] == "missing":
            raise JobNotFound(job.job_id)
        if res[0] == "bad_state":
            raise Conflict(f"job '{job.job_id}' is {res[1]}: only a pending or queued job's priority can change")
        return JobStatus(res[1])

    # ---- events and history -----------------------------------------------------------------------------

    async def add_event(
        self, job_id: str, event_type: str, message: str, data: Mapping[str, Any] | None = None
    ) -> None:
        now = time.time()
        await self.r.xadd(
            self.keys.job_events(job_id),
            {"type": event_type, "message": message, "time": repr(now), "data": json.dumps(dict(data or {}))},
            maxlen=self.events_max,
            approximate=True,
        )

    async def events(self, job_id: str, after: str | None, limit: int) -> list[Event]:
        start = f"({after}" if after else "-"
        rows = await self.r.xrange(self.keys.job_events(job_id), min=start, max="+", count=limit)
        return [
            Event(id=eid, time=float(f.get("time", 0)), type=f.get("type", ""), message=f.get("message", ""),
                  data=json.loads(f.get("data") or "{}"))
            for eid, f in rows
        ]  # fmt: skip

    async def append_history(self, job_id: str, points: list[dict[str, Any]]) -> None:
        if not points:
            return
        key = self.keys.job_history(job_id)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.rpush(key, *(json.dumps(p, separators=(",", ":")) for p in points))
            pipe.ltrim(key, -self.history_max, -1)
            await pipe.execute()

    async def history(self, job_id: str, limit: int) -> list[LossPoint]:
        raw = await self.r.lrange(self.keys.job_history(job_id), -limit, -1)
        return [LossPoint.model_validate(json.loads(x)) for x in raw]

    # ---- queue and leases -------------------------------------------------------------------------------

    async def queue_length(self) -> int:
        return int(await self.r.zcard(self.keys.queue))

    async def queue_position(self, job_id: str) -> int | None:
        rank = await self.r.zrank(self.keys.queue, job_id)
        return None if rank is None else int(rank) + 1

    async def queue_window(self, start: int, count: int) -> list[tuple[str, QueueMeta]]:
        ids = await self.r.zrange(self.keys.queue, start, start + count - 1)
        if not ids:
            return []
        metas = await self.r.hmget(self.keys.queue_meta, ids)
        pairs = [(job_id, m) for job_id, m in zip(ids, metas, strict=True) if m]
        decoded = json.loads("[" + ",".join(m for _, m in pairs) + "]")  # one parse, not one per job
        return [(job_id, QueueMeta(*fields)) for (job_id, _), fields in zip(pairs, decoded, strict=True)]

    async def leases(self) -> dict[int, str]:
        raw = await self.r.hgetall(self.keys.gpu_leases)
        return {int(k): v for k, v in raw.items()}

    async def drop_lease(self, gpu: int, job_id: str) -> bool:
        """Release one GPU lease if `job_id` still holds it (a lease whose job is gone)."""
        return bool(await self.r.eval(lua.DROP_LEASE, 1, self.keys.gpu_leases, str(gpu), job_id))

    async def mark_exporting(self, job_id: str, running: bool) -> None:
        if running:
            await self.r.sadd(self.keys.exporting, job_id)
        else:
            await self.r.srem(self.keys.exporting, job_id)

    async def exporting(self) -> list[str]:
        return sorted(await self.r.smembers(self.keys.exporting))

    async def publish_wakeup(self, reason: str) -> None:
        await self.r.publish(self.keys.wakeup_channel, reason)
