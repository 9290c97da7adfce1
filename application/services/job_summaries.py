"""A job's list entry (JobSummary), kept as one JSON string per job that every script changing the job rewrites
(`lua.SUMMARY_FIELDS`): a page is then one MGET, and nothing is decoded to serve it.

An entry written by a version with other fields lacks some: written again by a scheduler's start (all of them,
once the fields changed) and by the page that finds one. Runners outlive an upgrade, and an old one rewrote its
job's entry with the old fields after that start: the list said nothing of `error_code` or `kind` for the jobs
they ran, for good (hunt CC).
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from application.services import lua
from application.services.index_pages import advance_mark, walk_by_score, walk_from
from application.services.job_codec import script_arg
from application.services.keys import Keys

# New fields are appended, never inserted: an entry another version wrote is told by its last field's absence.
_LAST = f',"{lua.SUMMARY_FIELDS[-1]}":'


def stale(summary: str) -> bool:
    """Written by a version with fewer fields. Looked for near the end first, where this version writes it (with
    a short value): a page reads fifty of these."""
    return summary.rfind(_LAST, len(summary) - 64) == -1 and _LAST not in summary


def _with_every_field(summary: str) -> str:
    entry = json.loads(summary)
    return json.dumps({name: entry.get(name) for name in lua.SUMMARY_FIELDS} | entry, separators=(",", ":"))


class JobSummaries:
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.r: Any = client  # (decode_responses: str replies)
        self.keys = keys
        self._refresh = client.register_script(lua.REFRESH_SUMMARY)

    async def page_json(self, ids: list[str]) -> str:
        """The summary of each of `ids` still stored, as a JSON array."""
        summaries: list[str | None] = await self.r.mget([self.keys.job_summary(i) for i in ids]) if ids else []
        old = [job_id for job_id, s in zip(ids, summaries, strict=True) if s and stale(s)]
        if old:
            rewritten = await self._rewrite(old)
            summaries = [rewritten.get(job_id, s) for job_id, s in zip(ids, summaries, strict=True)]
        return "[" + ",".join(s for s in summaries if s) + "]"

    async def _rewrite(self, ids: list[str]) -> dict[str, str | None]:
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    await self._refresh(keys=[self.keys.job(job_id)], args=[
                        script_arg({"k": {"summary": self.keys.job_summary(job_id)}})], client=pipe)  # fmt: skip
                    pipe.get(self.keys.job_summary(job_id))
                replies = await pipe.execute()
            # (one still stale: its record is gone, the entry left until the next sweep forgets it; review CF)
            return {job_id: _with_every_field(s) if s and stale(s) else s
                    for job_id, s in zip(ids, replies[1::2], strict=True)}  # fmt: skip
        except RedisError:
            # (a Redis that takes no writes now: each field there all the same, null where the entry lacks it)
            summaries = await self.r.mget([self.keys.job_summary(i) for i in ids])
            return {job_id: _with_every_field(s) if s else None for job_id, s in zip(ids, summaries, strict=True)}

    async def backfill(self, batch: int = 500) -> int:
        """Write the summaries that records from before they were kept lack, and rewrite every one when they were
        written with other fields (a version that added `error_code`: a list entry of a job that ended before
        lacked the key for good, as nothing rewrites an ended job's summary). Once, at a scheduler's start."""
        fields = ",".join(lua.SUMMARY_FIELDS)
        every = await self.r.get(self.keys.summary_fields) != fields
        # Only the jobs created since the last start looked (a day before: other hosts' clocks), as the folders'
        # backfill does: creates write their summaries, so only a downgrade's jobs can lack one (a walk of every
        # job held a new leader's first pass back 3.5-5.6 s at 70,000 jobs: hunt DX). Every job when the fields
        # changed.
        mark = None if every else await self.r.get(self.keys.summaries_scanned)
        start, newest = walk_from(mark), None
        written = 0
        async for ids, newest_of_page in walk_by_score(self.r, self.keys.jobs_index, start, batch=batch):
            newest = newest_of_page
            async with self.r.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.exists(self.keys.job_summary(job_id))
                present = await pipe.execute()
            stale_ids = [job_id for job_id, there in zip(ids, present, strict=True) if every or not there]
            async with self.r.pipeline(transaction=False) as pipe:
                for job_id in stale_ids:
                    await self._refresh(keys=[self.keys.job(job_id)], args=[
                        script_arg({"k": {"summary": self.keys.job_summary(job_id)}})], client=pipe)  # fmt: skip
                written += sum(int(n) for n in await pipe.execute()) if stale_ids else 0
        await self.r.set(self.keys.summary_fields, fields)
        await advance_mark(self.r, self.keys.summaries_scanned, mark, newest)
        return written
