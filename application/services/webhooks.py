"""Webhook deliveries, in the leading scheduler: a POST per notification to each URL, signed, retried, recorded.

Notifications are queued in Redis in the same atomic step as the status change that causes them (lua.TRANSITION;
an export's end through JobStore.notify). The leader moves each from the queue to a `delivering` list, POSTs
it to each URL at once, with retries and exponential backoff, in tasks of their own (at most MAX_PARALLEL at
once to one URL, and OWNER_PARALLEL to one owner's own URLs, so a slow receiver holds up neither scheduling nor
the other receivers), records every
delivery as an event of the job, and only then drops it. A leader that dies mid-delivery leaves it in
`delivering`; the next leader queues it again (at least once).

Body: `{"event", "job_id", "at": <Unix seconds>, "message": <the event's, or null>, "job": <the job's summary as
lists show it>}`. Headers:
`X-Swift-Api-Event`, `X-Swift-Api-Delivery` (the same on retries), `X-Swift-Api-Signature: sha256=<HMAC-SHA256 of
the body with WEBHOOK_SECRET>`. A job's own webhook_url may not point into private networks unless
WEBHOOK_ALLOW_PRIVATE (`webhook_addresses`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import hashlib
import hmac
import json
import math
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from loguru import logger
from redis.exceptions import RedisError

from application.config import Settings
from application.services.cluster_store import ClusterStore
from application.services.job_store import JobStore
from application.services.webhook_addresses import aim

# POSTs under way to one URL at once, and to one owner's own URLs (its jobs' webhook_url) at once. Nothing
# bounds all notifications under way but MAX_BACKLOG: a cap for all (128, held until a job's own URL had its
# answer) let one user's few hundred jobs with a URL that never answers stop every delivery, the operator's
# included, for minutes (hunt DF). Each URL, and each owner's own URLs, now wait in lanes of their own; and once
# LANE_WAITING wait in a lane that has delivered nothing for STUCK_SECONDS, its next notifications are not posted
# there (recorded as webhook_failed) rather than queued without end. (A burst to a receiver that answers is never
# cut: review DJ.) A job's own URL that is one of the operator's is posted as its own too, in a lane of its own.
MAX_PARALLEL = 16
OWNER_PARALLEL = 16
LANE_WAITING = 256
STUCK_SECONDS = 300.0
MAX_BACKLOG = 10_000
RETRY_AFTER_MAX = 60.0  # the longest Retry-After (429, 503) honoured; longer ones wait this long
RETRIED_4XX = frozenset({408, 425, 429})  # the 4xx answers that a later attempt may not get; others are final
POLL_SECONDS = 0.5
WEBHOOK_ATTEMPTS_TTL = 86_400.0  # how long a delivery's count of attempts outlives its last attempt
RETRY_MIN, RETRY_MAX = 0.5, 10.0  # the pause after a Redis error, doubling while Redis does not answer


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def owner_key(secret: str, owner: str | None, generation: int = 0) -> str:
    """The key that signs the notifications to the own `webhook_url`s of `owner`'s jobs (None: no API_KEYS, where
    every caller is the same anonymous one): derived from WEBHOOK_SECRET, which a user verifying their own
    deliveries had to be given, and with it the power to forge the operator's (hunt DR). `generation` counts its
    rotations: one owner's key can be replaced without WEBHOOK_SECRET, and so everyone's (review DW)."""
    message = b"swift-api webhook owner:" + (owner or "").encode()
    if generation:
        message += b"\ngeneration:" + str(generation).encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


@dataclass
class _Lane:
    slots: asyncio.Semaphore
    users: int = 0  # holding or waiting
    progress: float = field(default_factory=time.monotonic)  # when it began, or last delivered


class Lanes:
    """At most `width` at once per key (a URL, an owner). A key's lane lives while someone holds or waits for it:
    a job's own URLs and their owners come and go."""

    def __init__(self, width: int) -> None:
        self.width = width
        self._lanes: dict[str, _Lane] = {}

    def stuck(self, key: str) -> int | None:
        """How many hold or wait for `key`'s lane, when LANE_WAITING or more do and it has delivered nothing for
        STUCK_SECONDS (since it began: a receiver that never answers); None otherwise."""
        lane = self._lanes.get(key)
        if lane is None or lane.users < LANE_WAITING or time.monotonic() - lane.progress < STUCK_SECONDS:
            return None
        return lane.users

    def delivered(self, key: str) -> None:
        if (lane := self._lanes.get(key)) is not None:
            lane.progress = time.monotonic()

    @contextlib.asynccontextmanager
    async def held(self, key: str) -> AsyncIterator[None]:
        lane = self._lanes.setdefault(key, _Lane(asyncio.Semaphore(self.width)))
        lane.users += 1
        try:
            async with lane.slots:
                yield
        finally:
            lane.users -= 1
            if not lane.users:
                del self._lanes[key]


def retry_after(value: str | None) -> float | None:
    """A Retry-After header's seconds (delay-seconds or an HTTP date, any of HTTP's three forms), None when absent
    or unreadable. (A receiver's header: nothing in it may raise out of a delivery, a year past 9999 included.)"""
    value = (value or "").strip()
    if value.isascii() and value.isdigit():
        return float(value)  # (inf past a float's range: capped by the caller)
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.replace(tzinfo=when.tzinfo or datetime.UTC).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError, OSError, IndexError):
        return None


class Webhooks:
    def __init__(self, store: JobStore, cluster: ClusterStore, settings: Settings) -> None:
        self.store = store
        self.cluster = cluster
        self.settings = settings
        self.secret = settings.WEBHOOK_SECRET.get_secret_value() if settings.WEBHOOK_SECRET else None
        self.urls = settings.webhook_urls()
        self._backlog = asyncio.Semaphore(MAX_BACKLOG)
        # Made once (about 20 ms of CPU each, on the scheduler's loop: a client per notification made a burst of
        # deliveries slow every scheduling pass 40-fold).
        self._tls: ssl.SSLContext | None = None
        self._urls = Lanes(MAX_PARALLEL)
        self._owners = Lanes(OWNER_PARALLEL)  # posts to a job's own URL, by the job's owner
        self._warned: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._held: Counter[str] = Counter()  # the notifications this leader's deliveries hold, as taken

    async def announce(self) -> None:
        """Tell every process whether all jobs notify (WEBHOOK_URLS) or only those with a webhook_url."""
        await self.cluster.announce_webhooks(bool(self.urls))
        if self.urls and not self.secret:
            logger.warning("WEBHOOK_URLS without WEBHOOK_SECRET: deliveries are not signed")

    async def run(self) -> None:
        """Deliver until cancelled (the lead lost, a stop). A Redis error, however long, only pauses it: the leader
        that keeps its lead through an outage must not go on without deliveries."""
        try:
            self._tls = await asyncio.to_thread(httpx.create_ssl_context)
        except Exception:  # (SSL_CERT_FILE unreadable, say: each delivery then says so, as before, not none at all)
            logger.exception("webhooks: the TLS context could not be made")
            self._tls = None
        await self._redis_retried(self._start)
        # A take whose answer an outage cut off may have moved a notification to the deliveries under way with no
        # task to deliver it: looked for once Redis answers again.
        orphans = False
        pause = RETRY_MIN
        try:
            while True:
                try:
                    if orphans and await self.cluster.requeue_orphan_deliveries(list(self._held.elements())):
                        logger.info("webhooks: requeued the notifications a take cut off by Redis left behind")
                    orphans = False
                    raw = await self.cluster.take_webhook()
                except RedisError as exc:
                    orphans = True
                    logger.warning("webhooks: Redis does not answer ({}); trying again in {:g} s", exc, pause)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, RETRY_MAX)
                    continue
                pause = RETRY_MIN
                if raw is None:
                    await asyncio.sleep(POLL_SECONDS)
                    continue
                await self._backlog.acquire()
                self._held[raw] += 1
                task = asyncio.create_task(self._deliver(raw))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _start(self) -> None:
        await self.announce()
        await self.cluster.requeue_webhook_deliveries()

    @staticmethod
    async def _redis_retried(step: Callable[[], Awaitable[None]]) -> None:
        pause = RETRY_MIN
        while True:
            try:
                await step()
                return
            except RedisError as exc:
                logger.warning("webhooks: Redis does not answer ({}); trying again in {:g} s", exc, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX)

    async def _deliver(self, raw: str) -> None:
        try:
            item = json.loads(raw)
            job = json.loads(item["summary"]) if item.get("summary") else None
            # The operator's URLs, then the job's own (checked: `own`, its owner's lane; with no keys, there are no
            # owners: its URL's own). One of the operator's named as the job's own is posted as both: as theirs (a
            # job must not be able to silence it), and as the job's, checked as any other, so that the answers never
            # tell a user which URLs are the operator's.
            targets: list[tuple[str, str | None, str | None]] = [(url, None, self.secret) for url in self.urls]
            if hook := item.get("hook"):
                owner = (job or {}).get("owner")
                signer = None
                if self.secret:
                    generation = 0

                    async def read() -> None:
                        nonlocal generation
                        generation = await self.cluster.signing_generation(owner)

                    await self._redis_retried(read)  # (its key now: one rotated since the event was queued)
                    signer = owner_key(self.secret, owner, generation)
                targets.append((hook, str(owner or f"url {hook}"), signer))
            at = float(item["at"]) if item.get("at") else None  # (stored as the text of a number)
            body = json.dumps({"event": item["event"], "job_id": item["job_id"], "at": at,
                               "message": item.get("message"), "job": job}).encode()  # fmt: skip
            # The notification's own id (its event's): the same when a new leader delivers it again (at least once).
            delivery = hashlib.sha256(str(item.get("id") or raw).encode()).hexdigest()[:32]
            async with httpx.AsyncClient(timeout=self.settings.WEBHOOK_TIMEOUT_SECONDS,
                                         verify=self._tls or True) as client:  # fmt: skip
                posts = [asyncio.ensure_future(self._post_in_turn(client, url, body, item, delivery, owner=of,
                                                                  signer=signer))
                         for url, of, signer in targets]  # fmt: skip
                try:
                    # One post's error cancels none of the others (a receiver's header that could not be read
                    # cancelled the operator's post mid-flight: review DJ).
                    for failed in await asyncio.gather(*posts, return_exceptions=True):
                        if isinstance(failed, Exception):
                            logger.opt(exception=failed).error("webhook post of job {} failed", item.get("job_id"))
                finally:  # (cancelled, the lead lost: none posts on, nor outlives the client)
                    for post in posts:
                        post.cancel()
                    await asyncio.gather(*posts, return_exceptions=True)
            # Dropped only once Redis takes it: left under way, it would be requeued and posted again.
            await self._redis_retried(lambda: self.cluster.webhook_delivered(raw))
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("webhook delivery failed")
        finally:
            self._held[raw] -= 1
            if self._held[raw] <= 0:
                del self._held[raw]
            self._backlog.release()

    async def _post_in_turn(self, client: httpx.AsyncClient, url: str, body: bytes, item: dict[str, Any],
                            delivery: str, owner: str | None, signer: str | None) -> None:  # fmt: skip
        """`_post` once one of the URL's slots is free, and for a job's own URL (`owner` given) one of its owner's
        too; not at all into a lane that is stuck (`Lanes.stuck`)."""
        lanes = [(self._urls, url)] if owner is None else [(self._owners, owner), (self._urls, f"own {url}")]
        for found, key in lanes:
            if (waiting := found.stuck(key)) is not None:
                whose = "this owner's jobs" if found is self._owners else "this URL"
                shown = url if owner is not None else f"WEBHOOK_URLS[{self.urls.index(url)}]"
                message = (
                    f"{item['event']} not sent to {shown}: {waiting} notifications for {whose} already wait, "
                    f"and none has been delivered for {STUCK_SECONDS:g} s (does a receiver not answer?)"
                )
                if self._warn_once(key):
                    logger.warning("webhook {} of job {}: {}", item["event"], item["job_id"], message)
                await self._record(item, "webhook_failed", message, shown, 0, None)
                return
        async with contextlib.AsyncExitStack() as held:
            for found, key in lanes:
                await held.enter_async_context(found.held(key))
            if await self._post(client, url, body, item, delivery, own=owner is not None, signer=signer):
                for found, key in lanes:
                    found.delivered(key)

    def _warn_once(self, key: str) -> bool:
        """A stuck lane is in the operator's log once a minute, not once per notification."""
        now = time.monotonic()
        if now - self._warned.get(key, -math.inf) < 60:
            return False
        self._warned[key] = now
        return True

    async def _post(self, client: httpx.AsyncClient, url: str, body: bytes, item: dict[str, Any], delivery: str,
                    own: bool, signer: str | None) -> bool:  # fmt: skip
        """POST with retries (signed with `signer`), the outcome recorded as the job's event; whether the URL took it
        (2xx)."""
        event = item["event"]
        checked = own and not self.settings.WEBHOOK_ALLOW_PRIVATE
        # The job's events (which its owner reads) name the operator's URLs by their place in the setting: such a
        # URL often carries a token (a chat webhook's), which would let any user post there.
        shown = url if own else f"WEBHOOK_URLS[{self.urls.index(url)}]"
        headers = {"Content-Type": "application/json", "User-Agent": "swift-api-webhooks",
                   "X-Swift-Api-Event": event, "X-Swift-Api-Delivery": delivery}  # fmt: skip
        if signer:
            headers["X-Swift-Api-Signature"] = signature(signer, body)
        attempts = self.settings.WEBHOOK_MAX_ATTEMPTS
        wait: float | None = None  # the seconds an answer's Retry-After asked for
        last = why = ""  # why: for the operator's log, which may say what the job's events do not
        attempt = 0
        # (the operator's URL named as the job's own is two targets, each with its own attempts: review EU)
        counted = f"{'own' if own else 'operator'} {url}"
        while (attempt := await self._next_attempt(delivery, counted, attempt)) <= attempts:
            try:
                # httpx's timeout bounds each read, not the POST: a receiver answering a byte a second held a
                # delivery slot for as long as it liked (all of them, with 16 such URLs).
                # Up to the answer's status line and headers only: its body is never read (a receiver's endless or
                # 600 MB answer was read whole into the leader's memory, and one trickled after its 200 timed
                # out a notification it had taken, to be posted again: hunt DF).
                async with asyncio.timeout(self.settings.WEBHOOK_TIMEOUT_SECONDS):
                    aimed = await aim(url) if checked else (url, {}, {})
                    if aimed is not None:
                        target, extra, extensions = aimed
                        async with client.stream("POST", target, content=body, headers={**headers, **extra},
                                                 extensions=extensions) as r:  # fmt: skip
                            pass
                        await self._attempt_made(delivery, counted)
                if aimed is None:
                    await self._record(item, "webhook_failed", f"{event} not sent to {url}: it points at this host or "
                                       "into a private network (set WEBHOOK_ALLOW_PRIVATE=true to allow)", shown, 0,
                                       None)  # fmt: skip
                    return False
                if 200 <= r.status_code < 300:
                    await self._record(item, "webhook_delivered", f"{event} delivered to {shown} (HTTP "
                                       f"{r.status_code}, attempt {attempt})", shown, attempt,
                                       r.status_code)  # fmt: skip
                    return True
                last = why = f"HTTP {r.status_code}"
                wait = retry_after(r.headers.get("Retry-After")) if r.status_code in (429, 503) else None
                if 400 <= r.status_code < 500 and r.status_code not in RETRIED_4XX:
                    # The receiver refuses this body for good (a bad payload, a URL it no longer has): another
                    # attempt gets the same answer.
                    await self._record(item, "webhook_failed", f"{event} not delivered to {shown}: it answered {last}, "
                                       "which another attempt would not change", shown, attempt,
                                       r.status_code)  # fmt: skip
                    if not own:
                        logger.warning("webhook {} of job {}: {} answered {}", event, item["job_id"], shown, last)
                    return False
                if 300 <= r.status_code < 400:
                    if not own:
                        logger.warning("webhook {} of job {}: {} answered {}, a redirect, which deliveries do "
                                       "not follow: set the URL it points to", event, item["job_id"], shown,
                                       last)  # fmt: skip
                    # Not followed, so not retried either: the same answer would come back each time.
                    await self._record(item, "webhook_failed", f"{event} not delivered to {shown}: it answered "
                                       f"{last}, a redirect, which deliveries do not follow: set the URL it points "
                                       "to", shown, attempt, r.status_code)  # fmt: skip
                    return False
            except (httpx.TimeoutException, TimeoutError) as exc:
                await self._attempt_made(delivery, counted)
                wait = None
                last = why = f"{type(exc).__name__}: no answer within {self.settings.WEBHOOK_TIMEOUT_SECONDS:g} s"
            except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:  # the last two: a URL that cannot be read
                await self._attempt_made(delivery, counted)
                wait = None
                # An error's text may hold the URL in some form of its own: an operator's is not shown at all.
                why = f"{type(exc).__name__}: {exc}"
                last = why if own else type(exc).__name__
            if attempt < attempts:
                backoff = self.settings.WEBHOOK_RETRY_SECONDS * 2 ** (attempt - 1)
                # A receiver that asked to wait (429, 503 with Retry-After) is not asked again sooner.
                await asyncio.sleep(max(backoff, min(wait, RETRY_AFTER_MAX)) if wait is not None else backoff)
        if not last:
            # Every attempt was an earlier leader's, which died before it dropped the notification: it may have
            # recorded the outcome, or been answered 200 at its last (review EU: a delivered one was said failed).
            logger.info("webhook {} of job {}: every attempt at {} was made by an earlier leader; not posted again",
                        event, item["job_id"], shown)  # fmt: skip
            return False
        if not own:  # (the operator's own URL: the job's events are the user's, its log is the operator's)
            logger.warning("webhook {} of job {} not delivered to {} after {} attempts ({})", event, item["job_id"],
                           shown, attempts, why)  # fmt: skip
        await self._record(item, "webhook_failed", f"{event} not delivered to {shown} after {attempts} attempts "
                           f"({last})", shown, attempts, None)  # fmt: skip
        return False

    async def _next_attempt(self, delivery: str, target: str, attempt: int) -> int:
        """The number of the next attempt: one more than those made, counted in Redis across leaders (review ER:
        a leader that started again began at 1, so a notification was retried without end while leaders kept
        dying); counted here alone while Redis does not answer."""
        try:
            return max(attempt, await self.cluster.webhook_attempts_made(delivery, target)) + 1
        except RedisError:
            return attempt + 1

    async def _attempt_made(self, delivery: str, target: str) -> None:
        """Counted once it has its outcome (an answer, or none in time): a post cut off with its leader is made
        again by the next (at least once)."""
        with contextlib.suppress(RedisError):
            await self.cluster.count_webhook_attempt(delivery, target, int(WEBHOOK_ATTEMPTS_TTL))

    async def _record(self, item: dict[str, Any], kind: str, message: str, url: str, attempts: int,
                      status: int | None) -> None:  # fmt: skip
        # Retried: a Redis error here (after the POST) skipped the job's own URL and left the notification under
        # way, to be posted again to everyone by the next leader.
        await self._redis_retried(lambda: self._record_once(item, kind, message, url, attempts, status))

    async def _record_once(self, item: dict[str, Any], kind: str, message: str, url: str, attempts: int,
                           status: int | None) -> None:  # fmt: skip
        job_id = item["job_id"]
        created = (json.loads(item["summary"]) if item.get("summary") else {}).get("created_at")
        # A deleted job gets no new event stream, and a new job given its id since (anyone's) not its deliveries.
        now = await self.store.get_field(job_id, "created_at")
        if now is not None and (created is None or now == created):
            await self.store.add_event(job_id, kind, message, {"url": url, "attempts": attempts, "status_code": status})
