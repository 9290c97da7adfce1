"""Per-owner limits on creates: a rate per API key and a cap on waiting jobs (429 with Retry-After); the
cap itself is counted by the store's create script."""

from __future__ import annotations

from application.auth import Caller
from application.config import Settings
from application.exceptions import TooMany
from application.services import clock
from application.services.cluster_store import ClusterStore, CreateContext
from application.services.keys import Keys

ANONYMOUS_BUCKET = "-"


class CreateLimits:
    def __init__(self, settings: Settings, keys: Keys, cluster: ClusterStore) -> None:
        self.rate = settings.create_rate()
        self.max_waiting = settings.MAX_QUEUED_PER_OWNER
        self.keys = keys
        self.cluster = cluster

    async def read(self, caller: Caller) -> CreateContext:
        """What a create needs from the store (one round trip), once this caller's limits let it through."""
        now = clock.now()
        rate = None
        if self.rate is not None:
            count, period = self.rate
            window = int(now // period)
            rate = (self.keys.rate(caller.name or ANONYMOUS_BUCKET, window), period)
        ctx = await self.cluster.create_context(rate)
        if self.rate is not None and ctx.rate_count is not None and ctx.rate_count > count:
            raise TooMany(
                f"at most {count} creates per {period:g} s for one key (CREATE_RATE_LIMIT): wait and retry",
                retry_after=(window + 1) * period - now,
            )
        return ctx

    def over_cap(self, owner: str | None, waiting: int) -> TooMany:
        """The refusal of a create the store found over MAX_QUEUED_PER_OWNER (it counts in the same step as
        it stores, so overlapping creates cannot all pass)."""
        return TooMany(
            f"'{owner}' already has {waiting} pending or queued jobs (MAX_QUEUED_PER_OWNER="
            f"{self.max_waiting}): wait for some to start, or cancel some",
            retry_after=60,
        )
