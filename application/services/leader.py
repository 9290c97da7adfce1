"""Which scheduler leads: a Redis lock with a TTL, whose value carries a fencing token.

The leader renews the lock every third of its TTL; a standby tries to take it every few hundred ms, so it
leads within about one TTL (LEADER_TTL_SECONDS, default 3 s) of the leader's death. Each leadership gets the
next value of a counter as its fencing token, and every start of a run checks (in the same Lua script) that
the lock still holds that value: a leader that stalled past its TTL and woke up cannot start anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time

from loguru import logger
from redis.exceptions import RedisError

from application.services.cluster_store import ClusterStore


def scheduler_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{int(time.time() * 1000)}"


class LeaderLock:
    def __init__(self, cluster: ClusterStore, ident: str, ttl: float) -> None:
        self.cluster = cluster
        self.ident = ident
        self.ttl = ttl
        self.value: str | None = None  # the lock's value while we lead: the fence every start carries
        self.lost = asyncio.Event()

    @property
    def leading(self) -> bool:
        return self.value is not None

    async def wait_for_leadership(self, poll: float = 0.2) -> str:
        while True:
            try:
                value = await self.cluster.acquire_leadership(self.ident, self.ttl)
            except RedisError as exc:
                logger.warning("scheduler {}: Redis does not answer ({}); still standing by", self.ident, exc)
                value = None
            if value:
                self.value = value
                self.lost.clear()
                logger.info("scheduler {} leads (fencing token {})", self.ident, value.partition(":")[0])
                return value
            await asyncio.sleep(poll)

    async def keep(self) -> None:
        """Renew the lock until it is lost (then set `lost` and return)."""
        assert self.value is not None
        interval = self.ttl / 3
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                if await self.cluster.renew_leadership(self.value, self.ttl):
                    last_ok = time.monotonic()
                    continue
                reason = "another scheduler holds the lock"
            except RedisError as exc:
                if time.monotonic() - last_ok < self.ttl:
                    continue  # the lock may still be ours: try again before it can have expired
                reason = f"Redis did not answer for a whole TTL ({exc})"
            logger.warning("scheduler {} lost the lead: {}", self.ident, reason)
            self.value = None
            self.lost.set()
            return

    async def release(self) -> None:
        if self.value is not None:
            with contextlib.suppress(RedisError):
                await self.cluster.release_leadership(self.value)
            self.value = None
