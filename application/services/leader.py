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
from application.services.redis_service import redis_refusal

# How often one Redis error met while standing by is logged again.
REPEAT_SECONDS = 30.0


def scheduler_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{int(time.time() * 1000)}"


class LeaderLock:
    def __init__(self, cluster: ClusterStore, ident: str, ttl: float) -> None:
        self.cluster = cluster
        self.ident = ident
        self.ttl = ttl
        self.value: str | None = None  # the lock's value while we lead: the fence every start carries
        self.lost = asyncio.Event()
        self.lost_reason: str | None = None  # why the last leadership ended, as logged
        # The last leadership ended with Redis losing the lock or away for a whole TTL: back, it may hold an older
        # state (a snapshot, a backup) that has forgotten runs that go on, on GPUs it shows as free.
        self.redis_lost_it = False
        self._renewed_at = time.monotonic()  # when the lock's TTL last started to run, at the latest

    @property
    def leading(self) -> bool:
        return self.value is not None

    async def wait_for_leadership(self, poll: float = 0.2) -> str:
        said: tuple[str, float] = ("", 0.0)
        while True:
            self._renewed_at = time.monotonic()  # (sent: see keep)
            try:
                value = await self.cluster.acquire_leadership(self.ident, self.ttl)
            except RedisError as exc:
                # An error Redis answers at once (a db out of range) comes every poll: said again twice a minute.
                if said[0] != str(exc) or time.monotonic() - said[1] > REPEAT_SECONDS:
                    why = redis_refusal(exc, self.cluster.keys.prefix) or f"Redis does not answer ({exc})"
                    logger.warning("scheduler {}: {}; still standing by", self.ident, why)
                    said = (str(exc), time.monotonic())
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
        last_ok = self._renewed_at
        away = False  # Redis did not answer a renewal since the last one it took
        while True:
            await asyncio.sleep(interval)
            # When the renewal was sent, not answered: the lock's new TTL runs from some moment after this, so a
            # lock found missing less than a TTL after it was not one that expired.
            sent = time.monotonic()
            try:
                if await self.cluster.renew_leadership(self.value, self.ttl):
                    last_ok, away = sent, False
                    continue
                reason, how = await self._why_refused(time.monotonic() - last_ok)
                # Away, then back without the lock, no one holding it: a Redis that restarted (in 2-3 s a lock of
                # 3 s looks expired), not a stall of this process.
                lost_by_redis = how == "gone" or (how == "expired" and away)
            except RedisError as exc:
                away = True
                if time.monotonic() - last_ok < self.ttl:
                    continue  # the lock may still be ours: try again before it can have expired
                reason, lost_by_redis = f"Redis did not answer for a whole TTL ({exc})", True
            logger.warning("scheduler {} lost the lead: {}", self.ident, reason)
            self.redis_lost_it = lost_by_redis
            self.lost_reason = reason
            self.value = None
            self.lost.set()
            return

    async def _why_refused(self, since_renewal: float) -> tuple[str, str]:
        """Why a renewal was refused. A lock that simply expired (this process or Redis stalled past the TTL, and no
        other scheduler exists) is not a lock taken by another scheduler: the operator looks for different causes
        (load on this host, versus a second scheduler they may not know of)."""
        try:
            holder = await self.cluster.leader()
        except RedisError as exc:
            return f"the lock is no longer ours, and who holds it cannot be read ({exc})", "unknown"
        if holder is not None:
            return (f"another scheduler holds the lock ({holder.scheduler_id}, fencing token "
                    f"{holder.value.partition(':')[0]})"), "taken"  # fmt: skip
        late = since_renewal - self.ttl
        if late >= 0:
            stalled = (
                f"the lock expired: renewed {since_renewal:.3f} s after the last renewal, {late:.3f} s "
                f"past its TTL of {self.ttl:g} s (this process or Redis stalled); no scheduler holds it now"
            )
            return stalled, "expired"
        # Within its TTL: Redis lost the key (a restart without persistence, a flush), not a late renewal.
        return (f"the lock is gone {since_renewal:.3f} s after the last renewal, before its TTL of {self.ttl:g} s ran "
                "out (Redis lost it: a restart or a flush? or its clock stepped forward, which expires keys early); no "
                "scheduler holds it now"), "gone"  # fmt: skip

    async def release(self) -> None:
        if self.value is not None:
            with contextlib.suppress(RedisError):
                await self.cluster.release_leadership(self.value)
            self.value = None
