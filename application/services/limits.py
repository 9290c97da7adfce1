"""Per-owner limits on creates: a rate per API key and a cap on waiting jobs (429 with Retry-After)."""

from __future__ import annotations

import time

from application.auth import Caller
from application.config import Settings
from application.exceptions import TooMany
from application.models.training_model import JobStatus
from application.services.cluster_store import ClusterStore
from application.services.job_store import JobStore

ANONYMOUS_BUCKET = "-"


class CreateLimits:
    def __init__(self, settings: Settings, store: JobStore, cluster: ClusterStore) -> None:
        self.rate = settings.create_rate()
        self.max_waiting = settings.MAX_QUEUED_PER_OWNER
        self.store = store
        self.cluster = cluster

    async def check(self, caller: Caller) -> None:
        if self.rate is not None:
            count, period = self.rate
            now = time.time()
            window = int(now // period)
            used = await self.cluster.hit_rate(self.store.keys.rate(caller.name or ANONYMOUS_BUCKET, window), period)
            if used > count:
                raise TooMany(
                    f"at most {count} creates per {period:g} s for one key (CREATE_RATE_LIMIT): wait and retry",
                    retry_after=(window + 1) * period - now,
                )
        if self.max_waiting and caller.name is not None:
            counts = await self.store.counts(caller.name)
            waiting = counts[JobStatus.QUEUED.value] + counts[JobStatus.PENDING.value]
            if waiting >= self.max_waiting:
                raise TooMany(
                    f"'{caller.name}' already has {waiting} pending or queued jobs (MAX_QUEUED_PER_OWNER="
                    f"{self.max_waiting}): wait for some to start, or cancel some",
                    retry_after=60,
                )
