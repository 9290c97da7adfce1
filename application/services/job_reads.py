"""Reads of job records and the job indexes: `JobStore` extends this class (callers use the store), as it does
`JobLog` and `QueueView`; writes, and the scripts that make them, are the store's own."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import redis.asyncio as aioredis

from application.models.training_model import Job, JobStatus
from application.services.index_pages import Cursor, ids_page
from application.services.job_codec import decode_job
from application.services.keys import Keys


def joined(fields: Mapping[str, str]) -> str:
    """A job's JSON text from its stored JSON values, nothing decoded."""
    return "{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}"


class JobReads:
    r: Any
    keys: Keys

    async def get(self, job_id: str) -> Job | None:
        raw = await self.r.hgetall(self.keys.job(job_id))
        return decode_job(raw) if raw else None

    async def exists(self, job_id: str) -> bool:
        return bool(await self.r.exists(self.keys.job(job_id)))

    async def get_many(self, job_ids: Iterable[str]) -> list[Job]:
        """The jobs whose records exist and this version can read (a value written by hand or by another
        version: skipped, as a sweep over many jobs must go on past it; `get` raises on it)."""
        ids = list(job_ids)
        if not ids:
            return []
        async with self.r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self.keys.job(job_id))
            raws = await pipe.execute()
        jobs = []
        for raw in raws:
            if raw:
                with contextlib.suppress(ValueError):
                    jobs.append(decode_job(raw))
        return jobs

    async def get_field(self, job_id: str, name: str) -> Any:
        raw = await self.r.hget(self.keys.job(job_id), name)
        return None if raw is None else json.loads(raw)

    async def get_fields(self, job_ids: list[str], names: list[str]) -> list[list[str | None]]:
        """Raw (still JSON-encoded) values of `names` for each job, one round trip."""
        return await job_fields(self.r, self.keys, job_ids, names)

    def _index(self, status: JobStatus | None, owner: str | None) -> str:
        k = self.keys
        if owner is None:
            return k.status_index(status) if status else k.jobs_index
        return k.owner_status_index(owner, status) if status else k.owner_index(owner)

    async def page(self, status: JobStatus | None, owner: str | None, offset: int, limit: int,
                   after: Cursor | None = None) -> tuple[int, list[str], Cursor | None]:  # fmt: skip
        """(jobs in all, a page of job ids at `offset` or `after` a cursor, newest first, the next page's cursor
        or None): every owner's when `owner` is None (index_pages)."""
        return await ids_page(self.r, self._index(status, owner), offset, limit, after)

    async def counts(self, owner: str | None = None) -> dict[str, int]:
        async with self.r.pipeline(transaction=False) as pipe:
            for s in JobStatus:
                pipe.zcard(self.keys.owner_status_index(owner, s) if owner else self.keys.status_index(s))
            values = await pipe.execute()
        return {s.value: int(v) for s, v in zip(JobStatus, values, strict=True)}

    async def job_json(self, job_id: str) -> tuple[str | None, dict[str, str]] | None:
        """(owner, the job's stored JSON values by field: `joined` makes them the whole job's JSON text); None
        when it does not exist."""
        raw = await self.r.hgetall(self.keys.job(job_id))
        if not raw:
            return None
        owner = raw.get("owner")
        return (json.loads(owner) if owner else None), raw

    async def ids_with_status(self, *statuses: JobStatus, created_after: float | None = None) -> list[str]:
        """The ids of the jobs in `statuses`; only those created after `created_after` when given."""
        return list(await self.created_times(*statuses, created_after=created_after))

    async def created_times(self, *statuses: JobStatus, created_after: float | None = None) -> dict[str, float]:
        """The jobs in `statuses` (created after `created_after` when given) and their creation times: the status
        indexes' scores."""
        low = "-inf" if created_after is None else f"({created_after!r}"
        async with self.r.pipeline(transaction=False) as pipe:
            for s in statuses:
                pipe.zrangebyscore(self.keys.status_index(s), low, "+inf", withscores=True)
            lists = await pipe.execute()
        return {job_id: float(score) for pairs in lists for job_id, score in pairs}


async def job_fields(r: aioredis.Redis, keys: Keys, job_ids: list[str], names: list[str]) -> list[list[str | None]]:
    """Raw (still JSON-encoded) values of `names` for each job, one round trip (the cluster store's backfill
    reads job records through this too)."""
    if not job_ids:
        return []
    async with r.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hmget(keys.job(job_id), names)
        rows: list[list[str | None]] = await pipe.execute()
    return rows
