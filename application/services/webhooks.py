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
WEBHOOK_ALLOW_PRIVATE: its name is resolved and checked before each attempt, and the POST goes to the address
checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import hmac
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import psutil
from loguru import logger
from redis.exceptions import RedisError

from application.config import Settings
from application.exceptions import Invalid
from application.services.cluster_store import ClusterStore
from application.services.job_store import JobStore

# POSTs under way to one URL at once, and to one owner's own URLs (its jobs' webhook_url) at once. Nothing
# bounds all notifications under way but MAX_BACKLOG: a cap for all (128, held until a job's own URL had its
# answer) let one user's few hundred jobs with a URL that never answers stop every delivery, the operator's
# included, for minutes (hunt DF). Such a user now waits in a lane of their own, and past OWNER_WAITING of
# theirs waiting, their own URLs are not posted to at all (recorded as webhook_failed) rather than queued without
# end. An operator's URL is posted once per notification whatever its jobs name.
MAX_PARALLEL = 16
OWNER_PARALLEL = 16
OWNER_WAITING = 256
MAX_BACKLOG = 10_000
RETRY_AFTER_MAX = 60.0  # the longest Retry-After (429, 503) honoured; longer ones wait this long
RETRIED_4XX = frozenset({408, 425, 429})  # the 4xx answers that a later attempt may not get; others are final
_LOOKUPS = ThreadPoolExecutor(4, thread_name_prefix="webhook-dns")  # (threads start at the first lookup)
POLL_SECONDS = 0.5
RETRY_MIN, RETRY_MAX = 0.5, 10.0  # the pause after a Redis error, doubling while Redis does not answer


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


_LOOKING_UP: dict[str, Future[list[str]]] = {}  # host -> its lookup under way, shared by all who ask meanwhile
_LOOKING_UP_LOCK = threading.RLock()  # (a lookup already done runs its callback at once, in the caller's thread)


def lookup(host: str) -> Future[list[str]]:
    """`addresses(host)` in the lookup threads, once at a time per host: a user's many notifications to one
    black-holed name held all 4 threads, and every other user's own URLs timed out waiting for one."""
    with _LOOKING_UP_LOCK:
        found = _LOOKING_UP.get(host)
        if found is None:
            found = _LOOKING_UP[host] = _LOOKUPS.submit(addresses, host)
            found.add_done_callback(lambda done: _looked_up(host, done))
        return found


def _looked_up(host: str, done: Future[list[str]]) -> None:
    with _LOOKING_UP_LOCK:
        if _LOOKING_UP.get(host) is done:
            del _LOOKING_UP[host]


def addresses(host: str) -> list[str]:
    """The addresses `host` names or resolves to, in the resolver's order; none when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# IPv6 forms that carry an IPv4 address a gateway may deliver to (NAT64, IPv4-compatible, SIIT's IPv4-translated),
# and the deprecated site-local range: Python calls them global.
_CARRIERS = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96", "::ffff:0:0:0/96",
                                                    "fec0::/10"))  # fmt: skip


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # (without an IPv6 zone: fe80::1%eth0)
    if not ip.is_global or ip.is_multicast:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour  # the kernel (mapped) or a relay (6to4) reaches this IPv4 address
        if inner is not None:
            return is_public(str(inner))
        if any(ip in net for net in _CARRIERS):
            return False
    return True


_OWN: tuple[float, frozenset[str]] = (float("-inf"), frozenset())
OWN_ADDRESSES_EVERY = 60.0


def own_addresses() -> frozenset[str]:
    """The addresses on this host's interfaces (read again once a minute: an interface may come or go)."""
    global _OWN
    if time.monotonic() - _OWN[0] > OWN_ADDRESSES_EVERY:
        found = {_plain(a.address) for nics in psutil.net_if_addrs().values() for a in nics
                 if a.family in (socket.AF_INET, socket.AF_INET6)}  # fmt: skip
        _OWN = (time.monotonic(), frozenset(found))
    return _OWN[1]


def _plain(address: str) -> str:
    """One spelling per address: no IPv6 zone, and an IPv4-mapped IPv6 address as its IPv4 one (the kernel
    delivers ::ffff:a.b.c.d to a.b.c.d)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    inner = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(inner or ip)


def literal_address(host: str) -> str | None:
    """The address a host written as one names (127.0.0.1, and the forms the resolver also reads as addresses:
    127.1, 0x7f000001, 2130706433, [::ffff:127.0.0.1], and any of them with the root's trailing dot), normalised;
    None for a name. No lookup is made."""
    host = host.removesuffix(".") if not host.startswith("[") else host
    try:
        return str(ipaddress.ip_address(host.strip("[]").split("%", 1)[0]))
    except ValueError:
        pass
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


def refuse_undeliverable(url: str) -> None:
    """A job's webhook_url written with an address the deliveries would never post to is refused at create, not
    stored to fail at each notification (a name is resolved, and checked, at each delivery)."""
    host = httpx.URL(url).host
    address = literal_address(host)
    if address is not None and not is_public(address):
        raise Invalid(f"webhook_url points at {host} ({address}), an address of this host or of a private network: "
                      "notifications are never posted there (WEBHOOK_ALLOW_PRIVATE=true allows it)")  # fmt: skip


def pinned(url: str, address: str) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
    """`url` aimed at `address`, as (URL, extra headers, request extensions): the Host header and the TLS name
    (SNI and the certificate check) stay the URL's host, so only the lookup is skipped."""
    parsed = httpx.URL(url)
    return (
        parsed.copy_with(host=address),
        {"Host": parsed.netloc.decode("ascii")},
        {"sni_hostname": parsed.raw_host.decode("ascii")},
    )  # (the name's ASCII form, as the lookup used)


class Lanes:
    """At most `width` at once per key (a URL, an owner). A key's semaphore lives while someone holds or waits for
    it: a job's own URLs and their owners come and go."""

    def __init__(self, width: int) -> None:
        self.width = width
        self._lanes: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}

    def users(self, key: str) -> int:
        """Those holding or waiting for `key`'s lane."""
        lane = self._lanes.get(key)
        return lane[1][0] if lane else 0

    @contextlib.asynccontextmanager
    async def held(self, key: str) -> AsyncIterator[None]:
        slots, users = self._lanes.setdefault(key, (asyncio.Semaphore(self.width), [0]))
        users[0] += 1
        try:
            async with slots:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._lanes[key]


def retry_after(value: str | None) -> float | None:
    """A Retry-After header's seconds (delay-seconds or an HTTP date), None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when.tzinfo else None


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
            # The operator's URLs, then the job's own (checked: `own`, its owner's lane). One of the operator's named
            # as the job's own is posted as both: as theirs (a job must not be able to silence it), and as the
            # job's, checked as any other, so that the answers never tell a user which URLs are the operator's.
            owner = str((job or {}).get("owner") or "")
            targets: list[tuple[str, str | None]] = [(url, None) for url in self.urls]
            if item.get("hook"):
                targets.append((item["hook"], owner))
            at = float(item["at"]) if item.get("at") else None  # (stored as the text of a number)
            body = json.dumps({"event": item["event"], "job_id": item["job_id"], "at": at,
                               "message": item.get("message"), "job": job}).encode()  # fmt: skip
            # The notification's own id (its event's): the same when a new leader delivers it again (at least once).
            delivery = hashlib.sha256(str(item.get("id") or raw).encode()).hexdigest()[:32]
            async with httpx.AsyncClient(timeout=self.settings.WEBHOOK_TIMEOUT_SECONDS,
                                         verify=self._tls or True) as client:  # fmt: skip
                posts = [asyncio.ensure_future(self._post_in_turn(client, url, body, item, delivery, owner=of))
                         for url, of in targets]  # fmt: skip
                try:
                    await asyncio.gather(*posts)
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
                            delivery: str, owner: str | None) -> None:  # fmt: skip
        """`_post` once one of the URL's slots is free, and for a job's own URL (`owner` given) one of its owner's."""
        if owner is None:
            async with self._urls.held(url):
                await self._post(client, url, body, item, delivery, own=False)
            return
        if self._owners.users(owner) >= OWNER_WAITING:
            await self._record(item, "webhook_failed", f"{item['event']} not sent to {url}: {OWNER_WAITING} "
                               "notifications of this owner's jobs already wait for their own webhook URLs (does "
                               "one not answer?)", url, 0, None)  # fmt: skip
            return
        async with self._owners.held(owner), self._urls.held(url):
            await self._post(client, url, body, item, delivery, own=True)

    async def _post(self, client: httpx.AsyncClient, url: str, body: bytes, item: dict[str, Any], delivery: str,
                    own: bool) -> None:  # fmt: skip
        event = item["event"]
        checked = own and not self.settings.WEBHOOK_ALLOW_PRIVATE
        # The job's events (which its owner reads) name the operator's URLs by their place in the setting: such a
        # URL often carries a token (a chat webhook's), which would let any user post there.
        shown = url if own else f"WEBHOOK_URLS[{self.urls.index(url)}]"
        headers = {"Content-Type": "application/json", "User-Agent": "swift-api-webhooks",
                   "X-Swift-Api-Event": event, "X-Swift-Api-Delivery": delivery}  # fmt: skip
        if self.secret:
            headers["X-Swift-Api-Signature"] = signature(self.secret, body)
        attempts = self.settings.WEBHOOK_MAX_ATTEMPTS
        wait: float | None = None  # the seconds an answer's Retry-After asked for
        last = why = ""  # why: for the operator's log, which may say what the job's events do not
        for attempt in range(1, attempts + 1):
            try:
                # httpx's timeout bounds each read, not the POST: a receiver answering a byte a second held a
                # delivery slot for as long as it liked (all of them, with 16 such URLs).
                # Up to the answer's status line and headers only: its body is never read (a receiver's endless or
                # 600 MB answer was read whole into the leader's memory, and one trickled after its 200 timed
                # out a notification it had taken, to be posted again: hunt DF).
                async with asyncio.timeout(self.settings.WEBHOOK_TIMEOUT_SECONDS):
                    aimed = await self._aim(url) if checked else (url, {}, {})
                    if aimed is not None:
                        target, extra, extensions = aimed
                        async with client.stream("POST", target, content=body, headers={**headers, **extra},
                                                 extensions=extensions) as r:  # fmt: skip
                            pass
                if aimed is None:
                    await self._record(item, "webhook_failed", f"{event} not sent to {url}: it points at this host or "
                                       "into a private network (set WEBHOOK_ALLOW_PRIVATE=true to allow)", shown, 0,
                                       None)  # fmt: skip
                    return
                if 200 <= r.status_code < 300:
                    await self._record(item, "webhook_delivered", f"{event} delivered to {shown} (HTTP "
                                       f"{r.status_code}, attempt {attempt})", shown, attempt,
                                       r.status_code)  # fmt: skip
                    return
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
                    return
                if 300 <= r.status_code < 400:
                    if not own:
                        logger.warning("webhook {} of job {}: {} answered {}, a redirect, which deliveries do "
                                       "not follow: set the URL it points to", event, item["job_id"], shown,
                                       last)  # fmt: skip
                    # Not followed, so not retried either: the same answer would come back each time.
                    await self._record(item, "webhook_failed", f"{event} not delivered to {shown}: it answered "
                                       f"{last}, a redirect, which deliveries do not follow: set the URL it points "
                                       "to", shown, attempt, r.status_code)  # fmt: skip
                    return
            except (httpx.TimeoutException, TimeoutError) as exc:
                wait = None
                last = why = f"{type(exc).__name__}: no answer within {self.settings.WEBHOOK_TIMEOUT_SECONDS:g} s"
            except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:  # the last two: a URL that cannot be read
                wait = None
                # An error's text may hold the URL in some form of its own: an operator's is not shown at all.
                why = f"{type(exc).__name__}: {exc}"
                last = why if own else type(exc).__name__
            if attempt < attempts:
                backoff = self.settings.WEBHOOK_RETRY_SECONDS * 2 ** (attempt - 1)
                # A receiver that asked to wait (429, 503 with Retry-After) is not asked again sooner.
                await asyncio.sleep(max(backoff, min(wait, RETRY_AFTER_MAX)) if wait is not None else backoff)
        if not own:  # (the operator's own URL: the job's events are the user's, its log is the operator's)
            logger.warning("webhook {} of job {} not delivered to {} after {} attempts ({})", event, item["job_id"],
                           shown, attempts, why)  # fmt: skip
        await self._record(item, "webhook_failed", f"{event} not delivered to {shown} after {attempts} attempts "
                           f"({last})", shown, attempts, None)  # fmt: skip

    @staticmethod
    async def _aim(url: str) -> tuple[str | httpx.URL, dict[str, str], dict[str, Any]] | None:
        """Where a job's own URL is posted: the address its name resolves to now, if public (None otherwise), used
        as it is. Letting the client resolve the name again would let a DNS answer that changed since the check
        (rebinding) reach a private address."""
        # The name as httpx sends it (IDNA 2008): resolving the text (IDNA 2003: straße.de as strasse.de) looked up
        # another domain than the Host header named.
        host = httpx.URL(url).raw_host.decode("ascii")
        # In threads of their own: a lookup a black-holed name server never answers holds its thread past the
        # attempt's timeout, and in the default pool a user's many such names stalled the scheduler's own reads.
        # (shielded: one caller given up cancels its own wait, not the lookup the others share)
        found = await asyncio.shield(asyncio.wrap_future(lookup(host)))
        # Nor this host's own public addresses: its services listening on every interface are not the user's.
        if not all(map(is_public, found)) or any(_plain(a) in own_addresses() for a in found):
            return None
        if not found:
            raise httpx.ConnectError(f"{host} does not resolve")
        return pinned(url, found[0])

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
