"""The queue, the GPU leases and the exports under watch, as the scheduler and the pages read them.

`JobStore` extends this class (callers use the store); its scripts are registered there, with the others.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from redis.commands.core import AsyncScript

from application.models.training_model import JobStatus
from application.services.job_codec import QueueMeta, script_arg
from application.services.keys import Keys


class PlanningState(NamedTuple):
    """What the scheduler plans on, read at one moment (`QueueView.planning_state`)."""

    leases: dict[int, str]  # GPU -> the job holding it
    running: list[str]
    queue_length: int
    history_version: int  # the run history's (`RunHistory`): what the predictions were made from


class QueueView:
    r: Any
    keys: Keys
    _drop_lease: AsyncScript
    _queue_page: AsyncScript
    _mark_heads: AsyncScript
    _forget_idle_export: AsyncScript

    async def planning_state(self) -> PlanningState:
        """GPU leases, running job ids, the queue's length and the run history's version, in one round trip. The
        version is read last: a run's end teaches the history before its script frees its GPUs, so a state that
        has them free has the version that knows that run (read before, the pass that the end woke started the
        job behind it with no prediction, and none came after: it no longer waited)."""
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.gpu_leases)
            pipe.zrange(self.keys.status_index(JobStatus.RUNNING), 0, -1)
            pipe.zcard(self.keys.queue)
            pipe.get(self.keys.history_version)
            leases, running, length, version = await pipe.execute()
        return PlanningState({int(k): v for k, v in leases.items()}, list(running), int(length), int(version or 0))

    async def queue_length(self) -> int:
        return int(await self.r.zcard(self.keys.queue))

    async def queue_position(self, job_id: str) -> int | None:
        rank = await self.r.zrank(self.keys.queue, job_id)
        return None if rank is None else int(rank) + 1

    async def queue_window(self, start: int, count: int) -> list[tuple[str, QueueMeta]]:
        return (await self.queue_page(start, count))[1]

    async def queue_page(self, start: int, count: int) -> tuple[int, list[tuple[str, QueueMeta]]]:
        """The queue's length, and what the planner needs of `count` queued jobs from rank `start`, read at one
        moment."""
        length, ids, metas = await self._queue_page(keys=[self.keys.queue, self.keys.queue_meta],
                                                    args=[start, start + count - 1])  # fmt: skip
        return int(length), self._decode_meta(ids, metas)

    async def queue_entries(self, ids: list[str]) -> list[tuple[str, QueueMeta]]:
        """What the planner needs of these jobs, those of them queued (in the order given)."""
        if not ids:
            return []
        return self._decode_meta(ids, await self.r.hmget(self.keys.queue_meta, ids))

    @staticmethod
    def _decode_meta(ids: list[str], metas: list[str | None]) -> list[tuple[str, QueueMeta]]:
        pairs = [(job_id, m) for job_id, m in zip(ids, metas, strict=True) if m]
        decoded = json.loads("[" + ",".join(m for _, m in pairs) + "]")  # one parse, not one per job
        return [(job_id, QueueMeta.of_items(fields)) for (job_id, _), fields in zip(pairs, decoded, strict=True)]

    async def head_clocks(self) -> dict[str, float]:
        """Since when each queued job that has been the head of the queue or of its priority has been (the
        starvation rule's clocks; the scripts drop a job's as it leaves the queue)."""
        return {job_id: float(since) for job_id, since in (await self.r.hgetall(self.keys.head_since)).items()}

    async def mark_heads(self, job_ids: list[str], since: float) -> None:
        """Start the clocks of these heads that have none, while they are queued."""
        if job_ids:
            await self._mark_heads(keys=[self.keys.queue, self.keys.head_since], args=[repr(since), *job_ids])

    async def queued_since(self, job_ids: list[str]) -> list[float | None]:
        """When each of these queued jobs entered the queue this time (a resumed, preempted or retried job keeps
        its submission time for its place, not for how long it has waited)."""
        return list(await self.r.zmscore(self.keys.queued_since, job_ids)) if job_ids else []

    async def leases(self) -> dict[int, str]:
        raw = await self.r.hgetall(self.keys.gpu_leases)
        return {int(k): v for k, v in raw.items()}

    async def drop_lease(self, gpu: int, job_id: str) -> bool | None:
        """Release one GPU lease if `job_id` still holds it (a lease whose job is not in the running index):
        whether it was released; None when the job's record says it runs on that GPU, and the index, which had
        lost it, holds it again."""
        done = await self._drop_lease(keys=[self.keys.gpu_leases, self.keys.job(job_id),
                                            self.keys.status_index(JobStatus.RUNNING)],
                                      args=[script_arg({"gpu": str(gpu), "id": job_id})])  # fmt: skip
        return None if int(done) < 0 else bool(done)

    async def forget_idle_export(self, job_id: str) -> bool:
        """Out of the exports to watch, unless an export of the job runs now; whether it was taken out."""
        return bool(await self._forget_idle_export(keys=[self.keys.job(job_id)], args=[script_arg({
            "id": job_id, "k": {"exporting": self.keys.exporting}})]))  # fmt: skip

    async def exporting(self) -> list[str]:
        return sorted(await self.r.smembers(self.keys.exporting))
