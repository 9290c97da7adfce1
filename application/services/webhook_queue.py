"""The webhook queue in Redis: notifications the store queues with each status change, the leader delivers.

`ClusterStore` extends this class (callers use it). A notification taken stays in the deliveries under way until
delivered, so a leader that goes (or an outage that cuts off a take's answer) loses none: delivered at least once.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Collection
from typing import Any

from application.services.keys import Keys


class WebhookQueue:
    r: Any
    keys: Keys

    async def announce_webhooks(self, every_job: bool) -> None:
        """Whether every job notifies (WEBHOOK_URLS), or only those with a webhook_url: read by the scripts."""
        if every_job:
            await self.r.set(self.keys.webhooks_global, "1")
        else:
            await self.r.delete(self.keys.webhooks_global)

    async def requeue_webhook_deliveries(self) -> None:
        """What a previous leader was delivering when it went, back in the queue (delivered at least once)."""
        # The newest taken first, each to the end deliveries are taken from: the oldest goes out first again.
        while await self.r.lmove(self.keys.webhooks_delivering, self.keys.webhooks, "LEFT", "RIGHT"):
            pass

    async def requeue_orphan_deliveries(self, held: Collection[str]) -> int:
        """The deliveries under way that no delivery of this leader holds (`held`), back in the queue: a take whose
        answer an outage cut off moved its notification with no one to deliver it. How many went back."""
        k = self.keys
        kept = Counter(held)
        orphans: list[str] = []
        for raw in await self.r.lrange(k.webhooks_delivering, 0, -1):  # the newest taken first
            if kept[raw]:
                kept[raw] -= 1
            else:
                orphans.append(raw)
        if orphans:
            async with self.r.pipeline(transaction=True) as pipe:
                for raw in orphans:  # as requeue_webhook_deliveries: the oldest goes out first again
                    pipe.lrem(k.webhooks_delivering, 1, raw)
                    pipe.rpush(k.webhooks, raw)
                await pipe.execute()
        return len(orphans)

    async def take_webhook(self) -> str | None:
        """The oldest notification, moved to the deliveries under way until `webhook_delivered`."""
        raw: str | None = await self.r.lmove(self.keys.webhooks, self.keys.webhooks_delivering, "RIGHT", "LEFT")
        return raw

    async def webhook_delivered(self, raw: str) -> None:
        await self.r.lrem(self.keys.webhooks_delivering, 1, raw)

    async def webhook_attempts_made(self, delivery: str, target: str) -> int:
        """The attempts at posting `delivery` to `target` (its URL, and whose it is) that every leader made and
        counted (`count_webhook_attempt`): one that died mid-delivery counted its own, the next goes on from there."""
        return int(await self.r.hget(self.keys.webhook_attempts(delivery), _target_field(target)) or 0)

    async def count_webhook_attempt(self, delivery: str, target: str, ttl: int) -> None:
        """One more attempt made at posting `delivery` to `target`; the count lapses `ttl` seconds after it."""
        key = self.keys.webhook_attempts(delivery)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, _target_field(target), 1)
            pipe.expire(key, ttl)
            await pipe.execute()

    async def signing_generation(self, owner: str | None) -> int:
        """How many times `owner`'s signing key was rotated (see `webhooks.owner_key`)."""
        return int(await self.r.hget(self.keys.webhook_signing, owner or "") or 0)

    async def rotate_signing_key(self, owner: str | None) -> int:
        """A new signing key for `owner`'s own webhook URLs (the one before no longer signs): its generation."""
        return int(await self.r.hincrby(self.keys.webhook_signing, owner or "", 1))


def _target_field(target: str) -> str:
    return hashlib.sha256(target.encode()).hexdigest()[:32]  # (a URL may hold a token: not kept as it is)
