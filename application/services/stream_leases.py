"""How many Server-Sent Events streams one key holds open, across every API worker (STREAMS_PER_OWNER).

A stream is long-lived and polls for as long as its client stays, so one script opening streams in a loop would
otherwise take every worker's file descriptors and a share of the CPU from everyone. Each stream holds a lease: a
member of its owner's sorted set, scored by when it lapses. Taking one drops the lapsed ones and counts the rest
in one script, so streams opened at once on several workers cannot pass the cap together. A stream renews its
lease as it sends (it sends a heartbeat at least every STREAM_HEARTBEAT_SECONDS) and gives it back when it ends
or its client hangs up; the leases of a worker killed with streams open lapse by themselves.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import redis.asyncio as aioredis
from loguru import logger
from redis.exceptions import RedisError

from application.config import Settings
from application.exceptions import TooMany
from application.services import lua
from application.services.job_codec import script_arg
from application.services.keys import Keys

ANONYMOUS_BUCKET = "-"


class Lease:
    def __init__(self, leases: StreamLeases, key: str) -> None:
        self.leases = leases
        self.key = key
        self.id = uuid.uuid4().hex
        self.renew_at = 0.0

    async def renew_if_due(self) -> None:
        now = time.monotonic()
        if now >= self.renew_at:
            self.renew_at = now + self.leases.ttl / 3
            async with self.leases.r.pipeline(transaction=False) as pipe:
                pipe.zadd(self.key, {self.id: time.time() + self.leases.ttl}, xx=True)
                pipe.pexpire(self.key, int(self.leases.ttl * 1000))
                await pipe.execute()

    async def release(self) -> None:
        await self.leases.r.zrem(self.key, self.id)


class StreamLeases:
    def __init__(self, client: aioredis.Redis, keys: Keys, settings: Settings) -> None:
        self.r: Any = client
        self.keys = keys
        self.cap = settings.STREAMS_PER_OWNER
        # Three heartbeats: a live stream renews well before its lease lapses, even when it only sends those.
        self.ttl = 3 * settings.STREAM_HEARTBEAT_SECONDS + settings.STREAM_POLL_SECONDS
        self._take = client.register_script(lua.STREAM_LEASE)

    async def take(self, owner: str | None) -> Lease | None:
        """A lease for one more stream of `owner` (None with no cap); TooMany when they hold the cap already."""
        if not self.cap:
            return None
        lease = Lease(self, self.keys.open_streams(owner or ANONYMOUS_BUCKET))
        now = time.time()
        held = int(await self._take(keys=[lease.key], args=[script_arg({
            "id": lease.id, "now": now, "expires": now + self.ttl, "cap": self.cap,
            "ttl_ms": int(self.ttl * 1000),
        })]))  # fmt: skip
        if held >= 0:
            raise TooMany(
                f"{owner or 'anonymous'} already has {held} streams open (STREAMS_PER_OWNER={self.cap}): close one "
                "(a dashboard tab, a curl -N) or wait for one to end",
                retry_after=5,
            )
        lease.renew_at = time.monotonic() + self.ttl / 3
        return lease


async def holding(lease: Lease | None, messages: AsyncIterator[str]) -> AsyncIterator[str]:
    """`messages`, with the stream's lease renewed as they go and given back at the end (a client hanging up
    included)."""
    if lease is None:
        async for message in messages:
            yield message
        return
    try:
        async for message in messages:
            try:
                await lease.renew_if_due()
            except RedisError as exc:  # the stream goes on; its next message tries again
                logger.warning("stream lease not renewed: {}", exc)
            yield message
    finally:
        # Shielded, for a stream that ends by its task being cancelled (a server shutting down, a client gone
        # mid-poll): in a cancelled scope every await is cancelled at once, and the lease would not go back.
        with anyio.CancelScope(shield=True), contextlib.suppress(RedisError):  # (else it lapses by itself)
            await lease.release()
