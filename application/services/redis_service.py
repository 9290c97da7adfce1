"""The Redis connection: its URL, retries and timeouts, lost replies, and the access and persistence checks
(the embedded redis-server used when none is configured: embedded_redis.py)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

import redis.asyncio as aioredis
from loguru import logger
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, NoPermissionError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from application.config import Settings

# Redis not answering (stopped, restarting, unreachable, hung), as against refusing a command: what is retried,
# and what a request or loop may outlast.
REDIS_AWAY = (RedisConnectionError, RedisTimeoutError)


def redis_url(settings: Settings) -> str:
    if settings.REDIS_URL:
        return settings.REDIS_URL
    host = settings.REDIS_HOST or "localhost"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    return f"redis://{host}:{settings.REDIS_PORT}/{settings.REDIS_DB}"


class RetryUnsent(Retry):
    """Tries a command again only when it cannot have reached Redis: its connection could not be made (refused,
    timed out while connecting) or was found closed before it went out. Not once it was sent: a reply that timed
    out, or a connection that dropped before the reply came (`ReplyLost`). Redis may have run that command all
    the same (busy behind another client's script, a fork's stall, a connection cut after the command), and a
    script run twice is not one run once (a create answered "exists" for the job it had just made, an upload
    counted twice against its owner's quota, a runner's end refused as "ended already", so no automatic export).
    The error reaches the caller, whose "the answer was lost" handling is there for it (lost_replies, the runner's
    outbox). A pooled connection Redis closed meanwhile (a restart, its idle `timeout`) is found closed when it is
    taken from the pool, once this process's event loop has seen the close, and replaced unseen; a command that
    changes nothing is sent again as before."""

    async def call_with_retry(self, do: Any, fail: Any, is_retryable: Any = None,
                              with_failure_count: bool = False) -> Any:  # fmt: skip
        return await super().call_with_retry(do, fail, _unsent, with_failure_count)


def _unsent(error: Exception) -> bool:
    # (a timed-out read is not sent again either: under a stalled Redis each try would wait a whole timeout)
    return not isinstance(error, ReplyLost) and not _sent_and_timed_out(error)


class ReplyLost(RedisConnectionError):
    """The connection failed after a command went out and before its reply came back: it may have run."""


class ReadTimedOut(RedisTimeoutError):
    """The reply of a command that changes nothing timed out: nothing can have been changed by it."""


def lost_reply_detail(method: str, error: Exception) -> str:
    """What a change whose Redis reply was lost answers (503): it may have been carried out."""
    # (not the error's text: it names Redis's address, which is the operator's; their log has it)
    return (f"Redis did not answer ({type(error).__name__}): this {method} may have been carried out all the same; "
            "once Redis is back, look at what it was to change (a GET) before you send it again")  # fmt: skip


def may_have_run(error: Exception) -> bool:
    """Whether the change that met `error` may have been made: its reply was lost, or timed out once sent."""
    return isinstance(error, ReplyLost) or (_sent_and_timed_out(error) and not isinstance(error, ReadTimedOut))


def _sent_and_timed_out(error: Exception) -> bool:
    # (redis-py's words for a connect that timed out; a change of them only stops those retries)
    return isinstance(error, RedisTimeoutError) and not str(error).startswith("Timeout connecting")


# Commands that change nothing (or, SCRIPT LOAD, nothing twice): sent again after a lost reply, as before.
_REPEATABLE = frozenset({
    "GET", "MGET", "EXISTS", "TTL", "PTTL", "TYPE", "STRLEN", "HGET", "HMGET", "HGETALL", "HEXISTS", "HLEN",
    "LRANGE", "LLEN", "SMEMBERS", "SCARD", "SISMEMBER", "SMISMEMBER", "ZRANGE", "ZRANGEBYSCORE", "ZREVRANGE",
    "ZREVRANGEBYSCORE", "ZCARD", "ZSCORE", "ZMSCORE", "ZRANK", "ZREVRANK", "ZCOUNT", "XRANGE", "XREVRANGE", "XLEN",
    "PING", "TIME", "INFO", "DBSIZE", "SCRIPT",
})  # fmt: skip


class _OwedReply:
    """Marks a connection failure met while a sent command's reply is owed as `ReplyLost`. Not marked: the
    handshake of a new connection (AUTH, SELECT), the PING of a health check, commands that change nothing,
    a pub/sub connection's messages, and errors Redis answered (LOADING, a refused password): those may all be
    sent again."""

    _owed = False
    _handshake = False
    _repeatable = False

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        self._handshake = True
        try:
            await super().on_connect_check_health(check_health)  # type: ignore[misc]
        finally:
            self._handshake = False

    async def send_command(self, *args: Any, **kwargs: Any) -> None:
        name = args[0] if args else b""
        # (redis-py sends some two-word commands as one argument: "SCRIPT LOAD")
        word = (name.decode() if isinstance(name, bytes) else str(name)).upper().split(" ", 1)[0]
        self._repeatable = word in _REPEATABLE
        await super().send_command(*args, **kwargs)  # type: ignore[misc]

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        self._owed = False
        repeatable, self._repeatable = self._repeatable, False  # (a pipeline's sends come here directly)
        await super().send_packed_command(command, check_health)  # type: ignore[misc]
        # (a command's own sends check health; a health check's PING, and a pipeline's later replies, don't
        # change what is owed: it stays owed until the next command goes out)
        self._owed = check_health and not self._handshake and not repeatable

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except RedisConnectionError as exc:
            # (only the connection's failure: LOADING and a refused password are Redis's answers, subclasses)
            if self._owed and type(exc) is RedisConnectionError and not kwargs.get("push_request"):
                raise ReplyLost(str(exc)) from exc
            raise
        except RedisTimeoutError as exc:
            if not self._owed and type(exc) is RedisTimeoutError:
                raise ReadTimedOut(str(exc)) from exc
            raise


class _Connection(_OwedReply, aioredis.Connection):
    pass


class _SSLConnection(_OwedReply, aioredis.SSLConnection):
    pass


class _UnixConnection(_OwedReply, aioredis.UnixDomainSocketConnection):
    pass


# A process's connections to Redis. Past them a command waits for one (as long as a connect and a reply may take):
# redis-py's default pool raised at once, so a burst of requests (400 starts at once) answered 503 "Redis does not
# answer" with Redis fine, and often after the change was made (its second command found no connection).
MAX_CONNECTIONS = 100


def create_client(settings: Settings, url: str) -> aioredis.Redis:
    retry = RetryUnsent(ExponentialBackoff(cap=1.0, base=0.05), settings.REDIS_RETRIES)
    scheme = urlsplit(url).scheme
    connection_class = {"rediss": _SSLConnection, "unix": _UnixConnection}.get(scheme, _Connection)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=settings.REDIS_CONNECT_TIMEOUT + settings.REDIS_SOCKET_TIMEOUT,
        connection_class=connection_class,
        password=settings.REDIS_PASSWORD,  # a password in REDIS_URL wins over it (redis-py's from_url)
        decode_responses=True,
        socket_timeout=settings.REDIS_SOCKET_TIMEOUT,
        socket_connect_timeout=settings.REDIS_CONNECT_TIMEOUT,
        retry=retry,
        retry_on_error=list(REDIS_AWAY),
        health_check_interval=30,
    )
    return aioredis.Redis.from_pool(pool)


# What a role needs of the Redis user, tried at start: its scripts, their keys, and their PUBLISH. A Redis 7 ACL
# user without channel rights (acl-pubsub-default resetchannels) failed every create's script after its writes:
# a 503 for a job that was in fact created and started.
_ACCESS_PROBE = "redis.call('EXISTS', KEYS[1]); redis.call('PUBLISH', ARGV[1], 'probe'); return 1"


def redis_refusal(exc: Exception, prefix: str) -> str | None:
    """What the operator must change when Redis refuses this server itself (not an outage): its credentials, or
    an ACL user's rights. None for anything else."""
    if isinstance(exc, AuthenticationError):
        return (f"Redis refused this server's credentials ({exc}): set the password (and the ACL user, if any) in "
                "REDIS_URL, or REDIS_PASSWORD")  # fmt: skip
    text = str(exc)
    if isinstance(exc, NoPermissionError) or "NOPERM" in text or "can't publish to the channel" in text:
        return (f"the Redis user may not do what the server needs ({text}): give it every command on keys and "
                f"channels under the prefix, e.g. ACL SETUSER <user> ~{prefix}:* &{prefix}:* +@all")  # fmt: skip
    return None


def check_redis_access(settings: Settings, url: str, timeout: float = 5.0) -> tuple[str | None, list[str]]:
    """What the Redis a role is given says before the role starts: one line saying what to change when it
    refuses the role (wrong password, an ACL user without the rights), and warnings of settings that lose jobs.
    Neither when it does not answer yet (a role waits for its Redis, as it outlasts an outage)."""
    from redis import Redis
    from redis.exceptions import RedisError

    from application.services.keys import Keys

    keys = Keys(settings.REDIS_KEY_PREFIX)
    try:
        client = Redis.from_url(url, password=settings.REDIS_PASSWORD, socket_timeout=timeout,
                                socket_connect_timeout=timeout, decode_responses=True)  # fmt: skip
        with client:
            client.eval(_ACCESS_PROBE, 1, keys.job("-access-probe-"), keys.wakeup_channel)
            return None, _data_loss_warnings(client)
    except RedisError as exc:
        return redis_refusal(exc, settings.REDIS_KEY_PREFIX), []


def _data_loss_warnings(client: Any) -> list[str]:
    """Redis settings under which jobs vanish: an evicting memory policy (a queued job's record evicted
    stalled the queue; a running one's left its GPUs leased), and no persistence at all. Unread where CONFIG is
    renamed away or refused (a managed Redis): nothing to say then."""
    from redis.exceptions import RedisError

    try:
        config = client.config_get("maxmemory-policy") | client.config_get("appendonly") | client.config_get("save")
    except RedisError:
        return []
    warnings = []
    policy = config.get("maxmemory-policy", "noeviction")
    if policy != "noeviction":
        warnings.append(f"Redis evicts keys when full (maxmemory-policy {policy}): jobs, leases and the queue can "
                        "vanish; set maxmemory-policy noeviction")  # fmt: skip
    if config.get("appendonly") == "no" and not config.get("save"):
        warnings.append("Redis keeps nothing across its restart (appendonly no, no save points): every job is lost "
                        "with it; set appendonly yes")  # fmt: skip
    elif config.get("appendonly") == "no":
        # Back from a snapshot, stops, pauses and deletes since are undone, and runs it forgot are run again.
        warnings.append(f"Redis keeps only its snapshots across a restart (appendonly no, save {config['save']}): "
                        "a restart loses what was written since the last one; set appendonly yes")  # fmt: skip
    return warnings


class RedisService:
    """Owns the client of one process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url: str = ""
        self.client: aioredis.Redis | None = None

    async def connect(self) -> aioredis.Redis:
        if self.settings.uses_embedded_redis:
            # Every role's processes must share one Redis: `python start.py` starts the embedded one for all.
            raise RuntimeError(
                "no Redis configured: set REDIS_URL (or REDIS_HOST), or start everything with `python start.py`, "
                "which runs an embedded redis-server for all roles"
            )
        self.url = redis_url(self.settings)
        logger.info("Using Redis at {}", _safe_url(self.url))
        self.client = create_client(self.settings, self.url)
        return self.client

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None


def _safe_url(url: str) -> str:
    """The URL without its credentials: the user info (up to the last '@' before the path) and any
    username/password query parameter (redis-py's way to give a unix socket a password)."""
    parts = urlsplit(url)
    netloc = f"***@{parts.netloc.rsplit('@', 1)[1]}" if "@" in parts.netloc else parts.netloc
    query = "&".join(
        f"{k}=***" if k.lower() in ("password", "username") else f"{k}={v}"
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )  # fmt: skip
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
