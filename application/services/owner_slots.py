"""At most so many long requests of one kind per key at once, counted in Redis over all API workers.

Server-Sent Events streams (STREAMS_PER_OWNER) poll for as long as their client stays, uploads
(UPLOADS_PER_OWNER) fill the disk before the quota can look at their size, and downloads (DOWNLOADS_PER_OWNER)
read and send checkpoints of gigabytes: one script opening any of them in a loop would otherwise take every
worker's sockets, CPU or disk from everyone. Each such request holds a slot: a member of
its owner's sorted set, scored by when it lapses. Taking one drops the lapsed ones and counts the rest in one
script, so requests made at once on several workers cannot pass the cap together. A request renews its slot as it
goes (a stream at each message, heartbeats included; an upload or download at each chunk) and gives it back
when it ends or its client hangs up; the slots of a worker killed mid-request lapse by themselves.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import anyio
import redis.asyncio as aioredis
from loguru import logger
from redis.exceptions import RedisError

from application.config import Settings
from application.exceptions import TooMany
from application.services import clock, lua_cluster
from application.services.job_codec import script_arg
from application.services.keys import Keys

ANONYMOUS_BUCKET = "-"
# A download's slot lapses when no chunk has passed for this long (it is renewed as they pass); an upload's
# lasts twice UPLOAD_IDLE_SECONDS, so that a stalled upload is ended before its slot can lapse, and at least this
# long (the checks of a large data set after its last chunk do not renew it).
DOWNLOAD_SLOT_SECONDS = 60.0
UPLOAD_SLOT_MIN_SECONDS = 60.0
T = TypeVar("T")


class Slot:
    def __init__(self, slots: OwnerSlots, key: str, owner: str | None) -> None:
        self.slots = slots
        self.key = key
        self.owner = owner
        self.id = uuid.uuid4().hex
        self.renew_at = time.monotonic() + slots.ttl / 3

    async def renewing(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """`items`, with the slot renewed as they come (a Redis error only logs: the next item tries again).
        A slot that lapsed meanwhile (a client that stopped reading for longer than it lasts) is taken again if
        the cap allows; else TooMany (an upload answers 429; a stream or download, already answering, ends:
        `holding`), or stalled requests would hold any number of slots."""
        async for item in items:
            now = time.monotonic()
            if now >= self.renew_at:
                self.renew_at = now + self.slots.ttl / 3
                try:
                    async with self.slots.r.pipeline(transaction=False) as pipe:
                        pipe.zadd(self.key, {self.id: clock.now() + self.slots.ttl}, xx=True, ch=True)
                        pipe.pexpire(self.key, int(self.slots.ttl * 1000))
                        renewed, _ = await pipe.execute()
                    if not renewed:
                        await self.slots.claim(self)
                except RedisError as exc:
                    logger.warning("slot not renewed: {}", exc)
            yield item

    async def release(self) -> None:
        # Shielded, for a request that ends by its task being cancelled (a server shutting down, a client gone
        # mid-poll): in a cancelled scope every await is cancelled at once, and the slot would not go back.
        with anyio.CancelScope(shield=True), contextlib.suppress(RedisError):  # (else it lapses by itself)
            await self.slots.r.zrem(self.key, self.id)
            self.slots.held.discard(self)  # (given back: `release_all` need not)


class OwnerSlots:
    def __init__(self, client: aioredis.Redis, key_of: Callable[[str], str], *, cap: int, ttl: float, setting: str,
                 what: str, advice: str) -> None:  # fmt: skip
        self.r: Any = client
        self.key_of = key_of
        self.cap = cap
        self.ttl = ttl
        self.setting = setting
        self.what = what
        self.advice = advice
        self._take = client.register_script(lua_cluster.OWNER_SLOT)
        self.held: set[Slot] = set()  # this process's, until given back

    async def release_all(self) -> None:
        """Give back every slot this process holds (a worker stopping): a stop cuts its streams when its grace runs
        out and closes Redis before their own release lands, and their slots stayed counted until they lapsed,
        their clients refused (429) as they reconnected."""
        held, self.held = list(self.held), set()
        if held:
            async with self.r.pipeline(transaction=False) as pipe:
                for slot in held:
                    pipe.zrem(slot.key, slot.id)
                await pipe.execute()

    async def take(self, owner: str | None, advice: str | None = None) -> Slot | None:
        """A slot for one more request of `owner` (None with no cap); TooMany when they hold the cap already,
        saying `advice` (what this request may do instead) or the slots' own."""
        if not self.cap:
            return None
        slot = Slot(self, self.key_of(owner or ANONYMOUS_BUCKET), owner)
        await self.claim(slot, advice)
        return slot

    async def claim(self, slot: Slot, advice: str | None = None) -> None:
        now = clock.now()
        held = int(await self._take(keys=[slot.key], args=[script_arg({
            "id": slot.id, "now": now, "expires": now + self.ttl, "cap": self.cap, "ttl_ms": int(self.ttl * 1000),
        })]))  # fmt: skip
        if held >= 0:
            raise TooMany(f"{slot.owner or 'anonymous'} already has {held} {self.what} ({self.setting}={self.cap}): "
                          f"{advice or self.advice}", retry_after=5)  # fmt: skip
        self.held.add(slot)


def stream_slots(client: aioredis.Redis, keys: Keys, settings: Settings) -> OwnerSlots:
    # Three heartbeats: a live stream renews well before its slot lapses, even when it only sends those. And longer
    # than a client may stall (CLIENT_STALL_SECONDS, then http_protocol drops it): a stream stuck in its send
    # renews nothing, its slot lapsed, and the cap let another open in its place (hunt BY).
    beats = max(3 * settings.STREAM_HEARTBEAT_SECONDS, settings.CLIENT_STALL_SECONDS + 5)
    return OwnerSlots(client, keys.open_streams, cap=settings.STREAMS_PER_OWNER,
                      ttl=beats + settings.STREAM_POLL_SECONDS,
                      setting="STREAMS_PER_OWNER", what="streams open",
                      advice="close one (a dashboard tab, a curl -N) or wait for one to end")  # fmt: skip


def upload_slots(client: aioredis.Redis, keys: Keys, settings: Settings) -> OwnerSlots:
    return OwnerSlots(client, keys.open_uploads, cap=settings.UPLOADS_PER_OWNER,
                      ttl=max(UPLOAD_SLOT_MIN_SECONDS, 2 * settings.UPLOAD_IDLE_SECONDS),
                      setting="UPLOADS_PER_OWNER", what="uploads in progress",
                      advice="wait for one to finish")  # fmt: skip


def download_slots(client: aioredis.Redis, keys: Keys, settings: Settings) -> OwnerSlots:
    return OwnerSlots(client, keys.open_downloads, cap=settings.DOWNLOADS_PER_OWNER, ttl=DOWNLOAD_SLOT_SECONDS,
                      setting="DOWNLOADS_PER_OWNER", what="downloads in progress",
                      advice="wait for one to finish (a Range request resumes a file where it stopped)")  # fmt: skip


class ResponseCut(Exception):
    """A download given up midway, raised out of its body: the server then drops the connection instead of ending
    the body as if it were whole (a tar has no Content-Length: its client took the short body for all of it)."""


async def holding(slot: Slot | None, items: AsyncIterator[T], *, whole: bool = False) -> AsyncIterator[T]:
    """`items`, with `slot` renewed as they go and given back at the end (a client hanging up included). One
    whose slot lapsed while its client stalled, and cannot take one again, ends there: a stream cleanly (its
    client reconnects), a body that must be `whole` (a download) by ResponseCut."""
    if slot is None:
        async for item in items:
            yield item
        return
    try:
        async for item in slot.renewing(items):
            yield item
    except TooMany as exc:  # its slot lapsed while the client stalled, and others took the cap meanwhile
        logger.info("{}: the response ends here", exc.detail)
        if whole:
            raise ResponseCut(exc.detail) from None
    finally:
        await slot.release()
